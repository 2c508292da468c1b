"""Generation: the jit KV-cache sampler (prefill + while_loop decode), logprobs out."""

from alignax.generation.sampler import Sampler, SamplingConfig, bucket_length

__all__ = ["Sampler", "SamplingConfig", "bucket_length"]
