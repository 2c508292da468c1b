"""alignax studio: a local web app over trained runs. Compare every stage's answers to a prompt
side by side, and label pairs of responses into a preference file that trains a reward model or
DPO directly (`alignax studio --workdir=runs/pipeline_tiny`)."""
