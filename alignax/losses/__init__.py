"""Pure loss and estimator functions: arrays in, arrays out."""
