"""vLLM as a server (``rollout.engine=vllm-server``): started by gspo on 127.0.0.1, or given by URL.

Sampling goes through the OpenAI-compatible ``/v1/completions`` endpoint, one request per row (each
row has its own seed; vLLM batches concurrent requests), with token ids in and out. Weights:

- on a CPU (tested): the merged weights are written as safetensors to a RAM-backed directory
  (``/dev/shm``), then ``POST /collective_rpc`` runs ``reload_weights(weights_path=...)`` and
  ``POST /reset_prefix_cache`` drops attention state computed with the old weights (both need the
  server's ``VLLM_SERVER_DEV_MODE=1``, which gspo sets for a server it starts);
- on a GPU: vLLM's weight-transfer API over NCCL (``/init_weight_transfer_engine`` once, then a
  broadcast per sync). This path is written against vLLM 0.32's ``NCCLTrainerWeightTransferEngine``
  and is NOT tested here (no GPU); the GPU tier (``tests/gpu``) is where it runs.

A server gspo starts dies with the run: it leads its own process group, gets SIGTERM when gspo dies
(``PR_SET_PDEATHSIG``) and watches gspo's pid (:mod:`gspo.rollout.vllm._serve`); ``close`` and an
``atexit`` hook stop the group. A server that stops answering is a :class:`ServerError` naming its URL.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from gspo import distributed as dist
from gspo.errors import GspoError
from gspo.precision import DTYPES
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams, check_request, request_seeds
from gspo.rollout.vllm.convert import Completion, sampling_kwargs, to_rollout
from gspo.rollout.vllm.local import vllm_environment
from gspo.rollout.vllm.placement import rendezvous_address
from gspo.rollout.vllm.weights import engine_weight_metadata, engine_weights, shm_directory, write_safetensors

MODEL_NAME = "gspo"  # the served model name requests refer to
START_TIMEOUT_S = 600.0  # imports alone take ~60 s on a loaded 2-core CPU
REQUEST_TIMEOUT_BASE_S = 600.0  # the blocking wait for one answer, before the length's share
REQUEST_TIMEOUT_PER_TOKEN_S = 0.25  # per token of rollout.max_new_tokens (4 tokens/s per sequence, a loaded MoE)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ClientLimits:
    """How the client talks to the server. ``concurrency``: requests in flight (client threads): the whole
    rollout batch, which vLLM batches as one. ``timeout_s``: the blocking wait for one answer (a completion
    is answered whole, so this covers a batch's longest generation, queueing included)."""

    concurrency: int = 64
    timeout_s: float = REQUEST_TIMEOUT_BASE_S


def client_limits(config) -> ClientLimits:
    """:class:`ClientLimits` from the batch and the length: ``rollout.prompts_per_step x group_size``
    requests at once; ``rollout.vllm_request_timeout_s``, or (0) ``REQUEST_TIMEOUT_BASE_S`` plus
    ``REQUEST_TIMEOUT_PER_TOKEN_S`` per token of ``rollout.max_new_tokens``."""
    r = config.rollout
    timeout = r.vllm_request_timeout_s or REQUEST_TIMEOUT_BASE_S + REQUEST_TIMEOUT_PER_TOKEN_S * r.max_new_tokens
    return ClientLimits(concurrency=max(1, r.prompts_per_step * r.group_size), timeout_s=float(timeout))


class ServerError(GspoError):
    """The vLLM server is unreachable, died, or answered with an error."""


class ServerProcess:
    """A vLLM server child process on 127.0.0.1 and a free port; stopped by :meth:`stop` or at exit."""

    def __init__(self, args: dict, *, kv_cache_gb: int, weight_transfer: bool, log_dir: Path | None = None,
                 gpu: int | None = None) -> None:
        """``gpu``: the CUDA device the server gets to itself (``CUDA_VISIBLE_DEVICES``); None on a CPU."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="gspo-vllm-server-")) / "vllm-server.log"
        command = [sys.executable, str(Path(__file__).with_name("_serve.py")), *_flags(args),
                   "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                   "--generation-config", "vllm"]
        if weight_transfer:
            command += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
        env = {**os.environ, **vllm_environment(kv_cache_gb, server=True), "GSPO_VLLM_PARENT_PID": str(os.getpid())}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine core as a child
        if gpu is not None:  # never the trainer's GPU (placement.server_gpu)
            env["CUDA_VISIBLE_DEVICES"] = _visible_device(gpu)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until ``/health`` answers; a ServerError with the log's tail if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the vLLM server at {self.url} exited with code {self.process.returncode} "
                                  f"while starting; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(1.0)
        self.stop()
        raise ServerError(f"the vLLM server at {self.url} did not answer /health within {timeout:.0f} s; "
                          f"its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace_s``. Idempotent."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)  # the engine core, should it outlive the server
        self.process.wait()
        self._log.close()
        atexit.unregister(self.stop)


class VLLMServerEngine:
    """A vLLM server behind gspo's :class:`~gspo.rollout.base.RolloutEngine` (see module docstring).

    ``server``: the process gspo started (stopped by :meth:`close`), or None for a server at ``url``.
    ``dtype``: the server's weights dtype when gspo started it ("float32", "bfloat16", ...); None for a
    server at a URL, whose dtype (and quantization) gspo cannot know. Only a float32 server declares
    ``behaviour_logprobs`` (``loss.old_logprobs=auto`` then trains on its log-probabilities, as with
    the in-process engine); a lower-precision or unknown one leaves ``auto`` recomputing pi_old
    (``loss.old_logprobs=rollout`` still takes the server's numbers when asked for).
    With several processes (torchrun) sharing one server, process 0 pushes the weights.
    """

    def __init__(self, url: str, *, pad_token_id: int, eos_ids: list[int], server: ServerProcess | None = None,
                 transport: str = "path", shared: bool = False, dtype: str | None = None,
                 limits: ClientLimits = ClientLimits()) -> None:
        self.url, self.server, self.limits = url.rstrip("/"), server, limits
        self.pad_token_id, self.eos_ids = int(pad_token_id), list(eos_ids)
        self.transport, self.shared = transport, shared
        self.dtype = DTYPES.get(dtype) if dtype else None  # weights are cast to it as they are pushed
        self.last_sync_s: float | None = None
        self._weights_dir: Path | None = None
        self._nccl = None  # the trainer side of vLLM's NCCL weight transfer (GPU), made at the first sync
        self._pool = ThreadPoolExecutor(limits.concurrency, thread_name_prefix="gspo-vllm-client")
        version = self._get("/version").get("version", "?")
        self._info = server_info(f"vLLM {version} server at {self.url}", dtype)

    @property
    def info(self) -> EngineInfo:
        return self._info

    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                 *, row_seeds: list[int] | None = None, record_routing: bool = False) -> Rollout:
        """One ``/v1/completions`` request per prompt, sent concurrently; every request is seeded."""
        check_request(prompts, params)
        if record_routing:  # the OpenAI endpoints do not return routed experts
            raise ValueError("record_routing=True: the vLLM server engine does not return routed experts; "
                             "use rollout.engine=vllm or moe.routing_replay=r2")
        seeds = request_seeds(len(prompts), row_seeds, generator)
        bodies = [self._completion_body(prompt, params, seed) for prompt, seed in zip(prompts, seeds)]
        start = time.perf_counter()
        answers = list(self._pool.map(lambda body: self._post("/v1/completions", body), bodies))
        generate_s = time.perf_counter() - start
        completions = [_completion(answer["choices"][0]) for answer in answers]
        rollout = to_rollout(prompts, completions, params, pad_token_id=self.pad_token_id, eos_ids=self.eos_ids)
        rollout.timings["sample/generate_s"] = generate_s
        if self.last_sync_s is not None:
            rollout.timings["sync/weights_s"], self.last_sync_s = self.last_sync_s, None
        return rollout

    def _completion_body(self, prompt: list[int], params: SamplingParams, seed: int) -> dict:
        body = sampling_kwargs(params, self.eos_ids, seed)
        for key in ("n", "detokenize"):  # not part of the completion request (one choice; ids returned)
            body.pop(key)
        return {**body, "model": MODEL_NAME, "prompt": list(prompt), "return_token_ids": True,
                "return_tokens_as_token_ids": True}

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s weights (LoRA merged) to the server, then reset its prefix cache.

        Every process calls this (gathering FSDP2 shards is a collective); with a shared server only
        process 0 pushes, and the others wait for it so nobody samples with old weights.
        """
        start = time.perf_counter()
        if self.transport == "nccl":
            self._push_nccl(model)
        else:
            weights = list(engine_weights(model, self.dtype))  # a collective under FSDP2: every process
            if not self.shared or dist.is_main():
                self._push_path(weights)
        if self.shared:
            dist.barrier()
        self.last_sync_s = time.perf_counter() - start

    def _push_path(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """CPU: safetensors in RAM, ``reload_weights(weights_path=...)``, then a prefix-cache reset."""
        if self._weights_dir is None:
            self._weights_dir = shm_directory()
        write_safetensors([(name, tensor.cpu()) for name, tensor in weights], self._weights_dir)
        self._post("/collective_rpc", {"method": "reload_weights",
                                       "kwargs": {"weights_path": str(self._weights_dir)}})
        self._post("/reset_prefix_cache", None)

    def _push_nccl(self, model: torch.nn.Module) -> None:
        """GPU: vLLM's NCCL weight transfer from ONE sending process (UNTESTED here: no GPU).

        Every process gathers the weights, one tensor at a time and in step (a collective under FSDP2);
        only process 0 joins vLLM's NCCL group, as its rank 0 (the sender), rendezvousing on an address the
        server's workers can reach, and streams each tensor in the server's dtype as it is gathered.
        """
        from vllm.distributed.weight_transfer.base import WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                  NCCLTrainerWeightTransferEngine)

        if self.shared and not dist.is_main():
            for _ in engine_weights(model, self.dtype):  # the gathers process 0's send iterates, in step
                pass
            return
        if self._nccl is None:
            world = int(self._get("/get_world_size").get("world_size", 1)) + 1  # the server's workers + us
            self._source = _merged_source(WeightSource, model, self.dtype)
            address = rendezvous_address(self.url)
            self._nccl = NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(master_address=address, master_port=_free_port(address), world_size=world,
                                    rank=0),
                client=HTTPVLLMWeightSyncClient(self.url, timeout=self.limits.timeout_s), source=self._source)
        self._source.model = model
        self._nccl.send_weights()
        self._post("/reset_prefix_cache", None)

    def close(self) -> None:
        """Stop the server gspo started (a server given by URL keeps running); idempotent."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None

    # -- HTTP -------------------------------------------------------------------------------------------
    def _get(self, path: str) -> dict:
        return self._request(urllib.request.Request(self.url + path))

    def _post(self, path: str, body: dict | None) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=self.limits.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerError(f"the vLLM server at {self.url} answered {request.full_url} with HTTP {exc.code}: "
                              f"{detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) and (self.server is None or self.server.process.poll() is None):
                raise ServerError(f"the vLLM server at {self.url} did not answer {request.full_url} within "
                                  f"{self.limits.timeout_s:.0f} s; raise rollout.vllm_request_timeout_s (0 = "
                                  f"{REQUEST_TIMEOUT_BASE_S:.0f} s + {REQUEST_TIMEOUT_PER_TOKEN_S} s per token of "
                                  "rollout.max_new_tokens) or lower the batch or length") from None
            state = ""
            if self.server is not None and self.server.process.poll() is not None:
                state = (f" (its process exited with code {self.server.process.returncode}; log "
                         f"{self.server.log_path}:\n{self.server.log_tail()})")
            raise ServerError(f"the vLLM server at {self.url} is not reachable ({reason}){state}; "
                              "check that it is running (rollout.server_url) or let gspo start one "
                              "(rollout.server_url=\"\")") from None
        return json.loads(payload) if payload else {}


def server_info(name: str, dtype: str | None) -> EngineInfo:
    """What a vLLM server declares: its log-probabilities are pi_old under ``auto`` only for a float32
    server gspo started (``dtype`` None: a server at a URL, dtype unknown, so not trusted)."""
    return EngineInfo(name=f"{name} ({dtype or 'dtype unknown'})", exact_logprobs=False,
                      behaviour_logprobs=dtype == "float32", records_routing=False, weight_sync="reload",
                      reproducible=True)


def _completion(choice: dict) -> Completion:
    """gspo's :class:`Completion` from one ``/v1/completions`` choice (token ids and their log-probs)."""
    tokens = [int(t) for t in choice["token_ids"]]
    return Completion(tokens, [float(lp) for lp in choice["logprobs"]["token_logprobs"]])


def _merged_source(base, model: torch.nn.Module, dtype: torch.dtype | None):
    """A vLLM ``WeightSource`` over :func:`engine_weights` (merged LoRA, vLLM's names, cast to ``dtype``): a
    fresh stream per send, one tensor gathered and cast at a time; the metadata without gathering."""
    from vllm.distributed.weight_transfer.base import ParamMeta

    class MergedSource(base):
        def __init__(self) -> None:
            self.model = model

        def metadata(self):
            return [ParamMeta(name, t, shape) for name, t, shape in engine_weight_metadata(self.model, dtype)]

        def __iter__(self):
            return engine_weights(self.model, dtype)

    return MergedSource()


def _flags(args: dict) -> list[str]:
    """``vllm.LLM`` keyword arguments as the server's command-line flags."""
    flags = ["--model", args["model"]]
    for key, value in args.items():
        if key == "model" or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def _free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _visible_device(index: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the ``index``-th GPU this process sees (it may itself be restricted)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


def _die_with_parent() -> None:
    """In the child before exec: lead a new process group, get SIGTERM when the parent dies."""
    os.setsid()
    with_libc = ctypes.CDLL(None, use_errno=True)
    with_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
