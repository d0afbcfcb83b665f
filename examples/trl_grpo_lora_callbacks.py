"""LoRA, two rewards, a callback that watches the reward and can stop early, and a saved adapter.

    python examples/trl_grpo_lora_callbacks.py

The same file runs on TRL with `from trl import GRPOConfig, GRPOTrainer` (a local model directory, an
in-memory dataset and plain reward functions need nothing else). GRPO_MAX_STEPS / GRPO_OUTPUT_DIR as in
trl_grpo_quickstart.py.
"""

import os
import random
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

import gspo
from gspo.trl import GRPOConfig, GRPOTrainer

MODEL = str(Path(gspo.__file__).parent / "assets" / "tiny-arith")
rng = random.Random(1)
pairs = [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(1000)]
dataset = Dataset.from_list([{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs])


def answer_text(completion):
    return completion.split("<eos>")[0].strip()


def correct(prompts, completions, answer, trainer_state=None, **kwargs):
    """The main signal: the exact sum."""
    return [float(answer_text(c) == a) for c, a in zip(completions, answer)]


def close(prompts, completions, answer, log_metric=None, **kwargs):
    """Partial credit for a sum that is off by a little; no score (None) when the reply is not a number."""
    scores = []
    for c, a in zip(completions, answer):
        text = answer_text(c)
        scores.append(max(0.0, 1.0 - abs(int(text) - int(a)) / 10) if text.isdigit() else None)
    if log_metric is not None:
        log_metric("numeric_fraction", sum(s is not None for s in scores) / len(scores))
    return scores


class RewardWatch(TrainerCallback):
    """Prints the mean reward at every log and ends the run once it stays high."""

    def __init__(self, target=0.95):
        self.target, self.history = target, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.history.append((state.global_step, logs["reward"]))
            print(f"step {state.global_step}: reward {logs['reward']:.3f}")
            if len(self.history) >= 3 and min(r for _, r in self.history[-3:]) >= self.target:
                control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        print(f"checkpoint at step {state.global_step}")


training_args = GRPOConfig(
    output_dir=os.environ.get("GRPO_OUTPUT_DIR", "grpo-tiny-arith-lora"),
    num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=2,
    max_completion_length=6, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=2,
    max_steps=int(os.environ.get("GRPO_MAX_STEPS", 60)), reward_weights=[1.0, 0.5],
    importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4,
    logging_steps=2, save_steps=20, bf16=False, gradient_checkpointing=False, report_to="none", seed=1,
)
trainer = GRPOTrainer(
    model=MODEL,
    reward_funcs=[correct, close],
    args=training_args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    callbacks=[RewardWatch()],
)
trainer.train()
trainer.save_model(training_args.output_dir)  # the adapter, with the base model's path in adapter_config.json
print(f"saved {training_args.output_dir}; log history has {len(trainer.state.log_history)} entries")
