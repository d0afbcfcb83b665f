"""One TRL script, run by TRL and by gspo: examples/trl_grpo_quickstart.py, same model, data and budget.

The gspo run is the file as it is (``from gspo.trl import ...``); the TRL run is a copy whose only change is
``from trl import GRPOConfig, GRPOTrainer``, run with TRL's own interpreter (a venv with ``trl``; gspo's
environment stays without it). Both save their model; this script then scores both saved models and the
starting model with the same code: greedy and sampled (4 per prompt, temperature 1) exact-answer accuracy
on held-out sums (the arithmetic task's held-out split, minus any sum the script trained on), and reads
the reward curve (mean per fifth of the run) from each run's ``trainer_state.json``.

    PYTHONPATH=src python benchmarks/bench_trl_script.py --trl-python /tmp/trl-venv/bin/python --max-steps 100

Results: benchmarks/results/bench_trl_script.json; docs/trl.md quotes them.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "trl_grpo_quickstart.py"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_trl_script.json"
GSPO_IMPORT = "from gspo.trl import GRPOConfig, GRPOTrainer"
TRL_IMPORT = "from trl import GRPOConfig, GRPOTrainer"
HELD_OUT = 200
SAMPLES = 4


def run_script(python: str, script: Path, out_dir: Path, max_steps: int) -> float:
    env = {**os.environ, "GRPO_MAX_STEPS": str(max_steps), "GRPO_OUTPUT_DIR": str(out_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(out_dir.with_suffix(".log"), "w") as log:
        subprocess.run([python, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def training_prompts() -> set[str]:
    """The prompts the script trains on: its own ``sums`` function, executed alone."""
    from datasets import Dataset

    tree = ast.parse(SCRIPT.read_text())
    sums = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "sums")
    scope = {"random": random, "Dataset": Dataset}
    exec(compile(ast.Module([sums], type_ignores=[]), str(SCRIPT), "exec"), scope)
    return set(scope["sums"](2000)["prompt"])


def accuracy(model_dir: Path, rows: list[dict]) -> dict[str, float]:
    """Greedy and sampled exact-answer accuracy of the model saved in ``model_dir`` (same code for every run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo.tasks.arithmetic import exact_answer_reward

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    for name, kwargs in (("greedy", {"do_sample": False}),
                         ("sampled", {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                      "num_return_sequences": SAMPLES})):
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, **kwargs)
        texts = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        repeat = len(texts) // len(rows)
        answers = [r["answer"] for r in rows for _ in range(repeat)]
        out[f"{name}_accuracy"] = sum(exact_answer_reward("", t, answer=a) for t, a in zip(texts, answers)) / len(texts)
    return out


def rewards(state_file: Path) -> dict:
    """The logged mean training reward in fifths of the run (each a mean over several logs), and the runtime."""
    history = json.loads(state_file.read_text())["log_history"]
    logs = [h["reward"] for h in history if "reward" in h]
    fifth = max(1, len(logs) // 5)
    return {"reward_by_fifth": [sum(logs[i * fifth:(i + 1) * fifth]) / fifth for i in range(5)], "logs": len(logs),
            "global_step": history[-1]["step"],
            "train_runtime_s": next((h["train_runtime"] for h in history if "train_runtime" in h), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-python", default="/tmp/trl-venv/bin/python", help="an interpreter with trl installed")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps (TRL's max_steps)")
    args = parser.parse_args()
    from gspo.tasks.arithmetic import ArithmeticTask

    seen = training_prompts()
    held = [r for r in ArithmeticTask(seed=0).eval_rows(HELD_OUT + 100) if r["prompt"] not in seen][:HELD_OUT]
    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-script-"))
    trl_script = tmp / SCRIPT.name
    source = SCRIPT.read_text()
    assert GSPO_IMPORT in source
    trl_script.write_text(source.replace(GSPO_IMPORT, TRL_IMPORT))
    version = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    load_start = os.getloadavg()
    runs = {"gspo": (sys.executable, SCRIPT), f"trl {version}": (args.trl_python, trl_script)}
    machine = platform.processor() or platform.machine()
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine,
                       "cpu_count": os.cpu_count(), "threads": 1, "max_steps": args.max_steps,
                       "held_out_rows": len(held), "samples_per_prompt": SAMPLES, "load_avg_start": load_start},
              "base": accuracy(ROOT / "src" / "gspo" / "assets" / "tiny-arith", held), "runs": {}}
    for name, (python, script) in runs.items():
        out = tmp / name.split()[0]
        wall = run_script(python, script, out, args.max_steps)
        result["runs"][name] = {"wall_s": wall, **rewards(out / "trainer_state.json"), **accuracy(out, held)}
        print(name, json.dumps(result["runs"][name]), flush=True)
    result["meta"]["load_avg_end"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
