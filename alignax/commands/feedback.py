"""`alignax label` and `alignax revise`: AI feedback against a constitution (Constitutional AI).

  alignax label  --judge=runs/pipeline_tiny_rlaif/sft --constitution=world \
      --pairs=pairs.jsonl --out=ai_pairs.jsonl [--principles_per_pair=2]
  alignax revise --policy=runs/pipeline_tiny_rlaif/sft --constitution=world \
      --prompts=prompts.jsonl --out=revised.jsonl [--rounds=1]

Both resume after a kill (rerun the same command) and refuse to resume with other settings
(`alignax.cai.labeling`, `alignax.cai.revision`).
"""

from __future__ import annotations


def label_main(flags) -> None:
  from alignax.cai import constitution as cai_constitution
  from alignax.cai.judge import Judge, load_chat_model
  from alignax.cai.labeling import label_file
  constitution = cai_constitution.load(flags.constitution)
  judge = Judge(load_chat_model(flags.judge), batch_size=flags.batch_size)
  summary = label_file(judge, constitution, flags.pairs, flags.out,
                       principles_per_pair=flags.principles_per_pair, seed=flags.seed,
                       both_orders=flags.both_orders, limit=flags.limit)
  print(f"label: {summary['pairs']} pairs in {flags.out} (judge {flags.judge}, constitution "
        f"{constitution.name}); mean chosen_prob {summary.get('mean_chosen_prob', float('nan')):.3f}, "
        f"the input's order kept for {summary.get('agrees_with_input', float('nan')):.1%}")


def revise_main(flags) -> None:
  from alignax.cai import constitution as cai_constitution
  from alignax.cai.judge import load_chat_model
  from alignax.cai.revision import ReviseConfig, Reviser, revise_file
  constitution = cai_constitution.load(flags.constitution)
  cfg = ReviseConfig(rounds=flags.rounds, temperature=flags.temperature,
                     max_new_tokens=flags.max_new_tokens, seed=flags.seed,
                     keep_if_critique_starts=flags.keep_if_critique_starts)
  reviser = Reviser(load_chat_model(flags.policy), cfg, batch_size=flags.batch_size)
  summary = revise_file(reviser, constitution, flags.prompts, flags.out, limit=flags.limit)
  print(f"revise: {summary['prompts']} prompts in {flags.out}; {summary.get('changed', 0)} "
        f"changed by revision, {summary.get('unfinished', 0)} whose final response did not end "
        f"with <eos> (kept, marked \"ended\": false)"
        + (f"; {summary['too_long_prompts_this_run']} prompts too long for the model's "
           f"max_seq_len were not sampled" if summary.get("too_long_prompts_this_run") else ""))
