"""GSPO on the embedded arithmetic model, written as a TRL script: only the import says gspo.

Run it with gspo:               python examples/trl_grpo_quickstart.py
Run the same file with TRL:     change the import to `from trl import GRPOConfig, GRPOTrainer`
(benchmarks/bench_trl_script.py does both and compares them; docs/trl.md has the numbers).
GRPO_MAX_STEPS and GRPO_OUTPUT_DIR shorten a run or move it (the tests use them).
"""

import os
import random
from pathlib import Path

from datasets import Dataset

import gspo
from gspo.trl import GRPOConfig, GRPOTrainer

MODEL = str(Path(gspo.__file__).parent / "assets" / "tiny-arith")  # a local Hugging Face directory


def sums(n: int, seed: int = 0) -> Dataset:
    """Addition problems with 1-3 digit operands; the model must write the sum, then stop."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = (rng.randint(0, 10 ** rng.randint(1, 3) - 1) for _ in range(2))
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_list(rows)


def exact_sum(prompts, completions, answer, **kwargs):
    """1.0 when the completion is the right sum (TRL's batched signature: lists in, a list out)."""
    return [1.0 if c.split("<eos>")[0].strip() == a else 0.0 for c, a in zip(completions, answer)]


# The GSPO recipe from the paper: sequence-level ratios, each response weighted once (loss_type="grpo"),
# a tight clip, and four optimizer steps per batch of generations.
args = GRPOConfig(
    output_dir=os.environ.get("GRPO_OUTPUT_DIR", "grpo-tiny-arith"),
    importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4,
    num_generations=8, per_device_train_batch_size=16, steps_per_generation=4,
    max_completion_length=8, learning_rate=1e-4, max_steps=int(os.environ.get("GRPO_MAX_STEPS", 100)),
    lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False,
    logging_steps=4, save_strategy="no", report_to="none", seed=0,
)
trainer = GRPOTrainer(model=MODEL, reward_funcs=exact_sum, args=args, train_dataset=sums(2000))
trainer.train()
trainer.save_model()
trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
