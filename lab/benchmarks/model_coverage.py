"""Which real-world models a default teleport handles: every torchvision classifier, timm's common
families and tiny Hugging Face transformers, each in train and in eval mode.

Each model is built with random weights (torchvision ``weights=None``, timm ``pretrained=False``,
Hugging Face tiny configs; nothing is downloaded) and teleported once with the library's defaults,
``Teleporter(model, loss_fn).teleport(inputs, targets, guard=(other inputs, other targets))``,
on a small random batch (seeded; labels are random class indices, token batches come with an
``attention_mask`` whose last sequence is padded, passed as a mapping). Recorded per model and
mode:

* ``steps``, ``stopped``, the teleport-batch loss's relative change and the gradient-norm gain
  (after / before);
* a held-out batch's relative loss change (an eval-mode no-grad forward before and after);
* the wall-clock seconds of the teleport (the ``Teleporter`` built included);
* the module types with trainable parameters no projector covers (left fixed by the default
  ``uncovered="warn"``);
* an outcome: ``clean`` (steps > 0, batch loss change <= 1e-5 relative, gain >= 1, held-out change
  <= 5%; a teleport whose step-length search ended it, ``stopped="line_search"``, after some
  steps counts here too), ``backtracked`` (a limit ended it: ``stopped`` in drift / guard / gain;
  drift and guard undo the step that broke them, gain stops before the next step),
  ``did not move`` (0 steps or a gain of exactly 1: no room, or no accepted step),
  ``not clean`` (moved, but broke a criterion of ``clean``), ``fails`` (an exception: its type,
  first line and where it was raised) or ``skipped`` (more than 150M parameters: too large for a
  24 GiB CPU machine);
* the peak resident memory of the process while the model was built and teleported (Linux).

Usage: ``python -m torch_teleport.lab.benchmarks.model_coverage [--family torchvision|timm|hf] [--only SUBSTRING]
[--threads 1]``; writes ``lab/benchmarks/results/model_coverage.json`` (``--out`` to change) and prints
a Markdown table and the totals per family and mode. The JSON is rewritten after every model;
``--resume`` keeps the models it already holds. The whole run takes about half an hour on one
CPU thread (1,858 s measured) and up to about 5 GiB of memory (regnet_y_32gf).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import json
import platform
import re
import subprocess
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.coverage import UncoveredParametersError, assign_projectors

MAX_PARAMETERS = 150_000_000
TOO_LARGE = "too large for a 24 GiB CPU machine"
IMAGES, LARGE_IMAGES = 8, 2
"""Images per batch (teleport, guard and held-out batch alike); at 224 pixels, where a model
needs them (MaxViT), the smaller number keeps the memory modest."""
SEQUENCES, TOKENS = 4, 16
"""Token batches: sequences of this many tokens (the last one padded to half its length)."""
LOSS_TOLERANCE, HELD_OUT_TOLERANCE = 1e-5, 0.05
"""The ``clean`` outcome's limits: relative batch-loss change and held-out loss change."""
BACKTRACKED = ("drift", "guard", "gain")
"""The limits whose stop counts as ``backtracked``."""
MODES = ("train", "eval")


@dataclass
class Case:
    """One model: how to build it (seeded), its batches and its loss."""

    family: str
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Any, Tensor]]
    loss: Callable[[Any, Tensor], Tensor]
    note: str = ""


# -- losses ---------------------------------------------------------------------------------
def logits_of(outputs: Any) -> Tensor:
    """The logits of a tensor, a ModelOutput (``.logits``) or an auxiliary-output tuple (first)."""
    if isinstance(outputs, Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, tuple | list):
        return outputs[0]
    raise TypeError(f"no logits in {type(outputs).__name__}")


def classification_loss(outputs: Any, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits_of(outputs), targets)


def causal_lm_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Next-token cross-entropy; targets are the token ids with -100 at padded positions."""
    logits = logits_of(outputs)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))


def seq2seq_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Cross-entropy of the decoder's logits against the target tokens (-100 ignored)."""
    logits = logits_of(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# -- batches --------------------------------------------------------------------------------
def images(size: int, classes: int, key: str | None = None):
    count = IMAGES if size < 224 else LARGE_IMAGES

    def batch(generator: torch.Generator) -> tuple[Any, Tensor]:
        x = torch.randn(count, 3, size, size, generator=generator)
        y = torch.randint(0, classes, (count,), generator=generator)
        return ({key: x} if key else x), y

    return batch


def _tokens(generator: torch.Generator, vocabulary: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(3, vocabulary, (SEQUENCES, TOKENS), generator=generator)
    mask = torch.ones(SEQUENCES, TOKENS, dtype=torch.long)
    mask[-1, TOKENS // 2 :] = 0  # right padding on the last sequence
    ids[-1, TOKENS // 2 :] = 0
    return ids, mask


def lm_tokens(vocabulary: int):
    def batch(generator: torch.Generator) -> tuple[Any, Tensor]:
        ids, mask = _tokens(generator, vocabulary)
        return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)

    return batch


def classified_tokens(vocabulary: int, classes: int):
    def batch(generator: torch.Generator) -> tuple[Any, Tensor]:
        ids, mask = _tokens(generator, vocabulary)
        return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, classes, (SEQUENCES,), generator=generator)

    return batch


def seq2seq_tokens(vocabulary: int):
    def batch(generator: torch.Generator) -> tuple[Any, Tensor]:
        ids, mask = _tokens(generator, vocabulary)
        labels = torch.randint(3, vocabulary, (SEQUENCES, TOKENS // 2), generator=generator)
        decoder = torch.cat([torch.zeros(SEQUENCES, 1, dtype=torch.long), labels[:, :-1]], 1)
        inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}
        return inputs, labels

    return batch


# -- the models -----------------------------------------------------------------------------
TORCHVISION_SIZES = {"alexnet": 64, "inception_v3": 80, "maxvit_t": 224}
"""Input sizes other than 32 (the smallest each accepts; MaxViT's 7x7 partitions need 224)."""
TORCHVISION_OPTIONS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}}
"""Builder options that shrink the input (ViT's position embeddings follow ``image_size``)."""


def torchvision_cases() -> list[Case]:
    import torchvision

    cases = []
    for name in torchvision.models.list_models(module=torchvision.models):
        options = TORCHVISION_OPTIONS.get(name, {})
        size = options.get("image_size", TORCHVISION_SIZES.get(name, 32))

        def build(name=name, options=options) -> nn.Module:
            return torchvision.models.get_model(name, weights=None, **options)

        note = f"{size}px" + "".join(f", {k}={v}" for k, v in options.items())
        note += "" if size < 224 else f", batch {LARGE_IMAGES}"
        cases.append(Case("torchvision", name, build, images(size, 1000), classification_loss, note))
    return cases


TIMM_MODELS = {
    "resnet18": (32, {}),
    "efficientnet_b0": (32, {}),
    "convnext_atto": (32, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
    "deit_tiny_patch16_224": (32, {"img_size": 32}),
    "mobilenetv3_small_050": (32, {}),
    "regnetx_002": (32, {}),
    "swin_tiny_patch4_window7_224": (64, {"img_size": 64, "window_size": 2}),
    "mixer_s16_224": (32, {"img_size": 32}),
    "levit_128s": (64, {"img_size": 64}),
    "mobilevit_xxs": (64, {}),
    "poolformer_s12": (32, {}),
    "ghostnet_100": (32, {}),
    "densenet121": (32, {}),
    "dla34": (32, {}),
}
"""timm variants: input size and the ``create_model`` options that shrink it where timm allows."""


def timm_cases() -> list[Case]:
    import timm

    cases = []
    for name, (size, options) in TIMM_MODELS.items():

        def build(name=name, options=options) -> nn.Module:
            return timm.create_model(name, pretrained=False, num_classes=100, **options)

        note = f"{size}px" + "".join(f", {k}={v}" for k, v in options.items())
        cases.append(Case("timm", name, build, images(size, 100), classification_loss, note))
    return cases


VOCABULARY = 128


def hf_cases() -> list[Case]:
    import transformers as hf

    return [
        Case(
            "hf",
            "gpt2 (GPT2LMHeadModel)",
            lambda: hf.GPT2LMHeadModel(
                hf.GPT2Config(
                    vocab_size=VOCABULARY, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                    bos_token_id=1, eos_token_id=2,
                )
            ),
            lm_tokens(VOCABULARY),
            causal_lm_loss,
            "n_embd 32, 2 layers",
        ),
        Case(
            "hf",
            "bert (BertForSequenceClassification)",
            lambda: hf.BertForSequenceClassification(
                hf.BertConfig(
                    vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=3,
                )
            ),
            classified_tokens(VOCABULARY, 3),
            classification_loss,
            "hidden 32, 2 layers, 3 labels",
        ),
        Case(
            "hf",
            "llama (LlamaForCausalLM)",
            lambda: hf.LlamaForCausalLM(
                hf.LlamaConfig(
                    vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                )
            ),
            lm_tokens(VOCABULARY),
            causal_lm_loss,
            "hidden 32, 2 layers, grouped KV heads",
        ),
        Case(
            "hf",
            "vit (ViTForImageClassification)",
            lambda: hf.ViTForImageClassification(
                hf.ViTConfig(
                    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10,
                )
            ),
            images(32, 10, key="pixel_values"),
            classification_loss,
            "32px, patch 8, hidden 32, 2 layers",
        ),
        Case(
            "hf",
            "t5 (T5ForConditionalGeneration)",
            lambda: hf.T5ForConditionalGeneration(
                hf.T5Config(
                    vocab_size=VOCABULARY, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                )
            ),
            seq2seq_tokens(VOCABULARY),
            seq2seq_loss,
            "d_model 32, 2+2 layers",
        ),
        Case(
            "hf",
            "bart (BartForConditionalGeneration)",
            lambda: hf.BartForConditionalGeneration(
                hf.BartConfig(
                    vocab_size=VOCABULARY, d_model=32, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                    decoder_ffn_dim=64, max_position_embeddings=64,
                )
            ),
            seq2seq_tokens(VOCABULARY),
            seq2seq_loss,
            "d_model 32, 2+2 layers",
        ),
    ]


FAMILIES = {"torchvision": torchvision_cases, "timm": timm_cases, "hf": hf_cases}


# -- one run --------------------------------------------------------------------------------
def parameter_count(case: Case) -> int:
    """Parameters of the model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = case.build()
    return sum(p.numel() for p in model.parameters())


def uncovered_types(model: nn.Module) -> list[str]:
    """The module types holding trainable parameters that no projector claims."""
    coverage = assign_projectors(model, tt.default_registry())
    kinds = Counter(type(model.get_submodule(coverage.owners[name])).__name__ for name in coverage.uncovered())
    return [f"{kind} ({count})" for kind, count in sorted(kinds.items())]


def held_out_loss(model: nn.Module, case: Case, batch: tuple[Any, Tensor]) -> float:
    """The loss of an eval-mode, no-grad forward (the model's modes restored)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return float(case.loss(_call(model, batch[0]), batch[1]))
    finally:
        for module, training in modes:
            module.training = training


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def relative(after: float, before: float) -> float:
    return abs(after - before) / max(abs(before), 1e-30)


def classify(row: dict) -> tuple[str, str]:
    """The outcome and, unless clean, why."""
    if row["steps"] == 0 or row["gain"] == 1.0:
        return "did not move", f"{row['steps']} steps, stopped {row['stopped']}"
    if row["stopped"] in BACKTRACKED:
        return "backtracked", f"stopped {row['stopped']} after {row['steps']} steps"
    broken = []
    if row["rolled_back"]:
        broken.append("rolled back")
    # (the drift limit compares the same numbers multiplied out: allow its last bit of rounding)
    if not row["batch_loss_change"] <= LOSS_TOLERANCE * (1 + 1e-9):
        broken.append(f"batch loss changed {row['batch_loss_change']:.2e}")
    if not row["gain"] >= 1:
        broken.append(f"gain {row['gain']:.3f} < 1")
    if not row["held_out_change"] <= HELD_OUT_TOLERANCE:
        broken.append(f"held-out loss changed {row['held_out_change']:.1%}")
    if broken:
        return "not clean", "; ".join(broken) + f" (stopped {row['stopped']})"
    return "clean", ""


PAPER_MODE = {"null_space": "exact", "lr": 0.005, "uncovered": "freeze"}
"""The paper's teleport: the exact null space of the batch at its fixed rate 0.005."""


def paper_mode(case: Case, model: nn.Module, batch: tuple, guard: tuple) -> dict[str, Any]:
    """The gain of the paper's teleport of a copy of ``model`` from the same point, on the same batch
    and guard (the same limits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            report = tt.Teleporter(copy.deepcopy(model), case.loss, **PAPER_MODE).teleport(*batch, guard=guard)
        except Exception as error:  # measured for comparison only: the default's run records failures
            return {"paper_gain": None, "paper_error": f"{type(error).__name__}: {error}"[:200]}
    return {"paper_gain": report.gain, "paper_steps": report.steps, "paper_stopped": report.stopped}


def run_mode(case: Case, model: nn.Module, mode: str) -> dict:
    """Teleport ``model`` (in ``mode``) once with the defaults and measure it."""
    generator = torch.Generator().manual_seed(0)
    batch, guard, held_out = (case.batch(generator) for _ in range(3))
    model.train(mode == "train")
    row: dict[str, Any] = {"family": case.family, "model": case.name, "mode": mode, "note": case.note}
    row["uncovered"] = uncovered_types(model)
    held_before = held_out_loss(model, case, held_out)
    row.update(paper_mode(case, model, batch, guard))
    options: dict[str, Any] = {}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            teleporter = tt.Teleporter(model, case.loss)
        except UncoveredParametersError:
            # Defaults that refuse uncovered parameters: leave them fixed instead, and say so.
            options = {"uncovered": "warn"}
            teleporter = tt.Teleporter(model, case.loss, **options)
        report = teleporter.teleport(*batch, guard=guard)
    seconds = time.perf_counter() - started
    held_after = held_out_loss(model, case, held_out)
    row.update(
        options=options,
        steps=report.steps,
        stopped=report.stopped,
        rolled_back=report.rolled_back,
        loss_before=report.loss_before,
        batch_loss_change=report.loss_change,
        grad_norm_before=report.grad_norm_before,
        grad_norm_after=report.grad_norm_after,
        gain=report.gain,
        guard_loss_before=report.guard_loss_before,
        guard_loss_after=report.guard_loss_after,
        held_out_before=held_before,
        held_out_change=relative(held_after, held_before),
        seconds=seconds,
        sites=len(report.layers),
        sites_with_room=sum(layer.null_dim > 0 for layer in report.layers),
        frozen=len(report.frozen),
        warnings=sorted({str(w.message).split(". ")[0][:200] for w in caught if not issubclass(w.category, DeprecationWarning)}),
    )
    row["outcome"], row["reason"] = classify(row)
    return row


def reset_peak_memory() -> None:
    """Reset the resident set size high-water mark (Linux; elsewhere nothing is measured)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gib() -> float | None:
    """The resident set size high-water mark since the last reset, in GiB (Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) / 2**20 if found else None


def run_case(case: Case) -> list[dict]:
    reset_peak_memory()
    rows = _run_case(case)
    peak = peak_memory_gib()
    return [{**row, "peak_memory_gib": peak} for row in rows]


def _run_case(case: Case) -> list[dict]:
    base = {"family": case.family, "model": case.name, "note": case.note}
    try:
        parameters = parameter_count(case)
    except Exception:  # a builder that does not run on the meta device: count it for real below
        parameters = None
    if parameters is not None and parameters > MAX_PARAMETERS:
        reason = f"{TOO_LARGE} ({parameters / 1e6:.0f}M parameters)"
        return [{**base, "mode": mode, "parameters": parameters, "outcome": "skipped", "reason": reason} for mode in MODES]
    try:
        torch.manual_seed(0)
        model = case.build()
    except Exception as error:
        return [{**base, "mode": mode, "parameters": parameters, **failure(error)} for mode in MODES]
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:  # (counted for real: its builder does not run on the meta device)
        del model
        gc.collect()
        reason = f"{TOO_LARGE} ({parameters / 1e6:.0f}M parameters)"
        return [{**base, "mode": mode, "parameters": parameters, "outcome": "skipped", "reason": reason} for mode in MODES]
    start = copy.deepcopy(model.state_dict())
    rows = []
    for mode in MODES:
        model.load_state_dict(start)
        try:
            row = run_mode(case, model, mode)
        except Exception as error:
            row = {**base, "mode": mode, **failure(error)}
        rows.append({**row, "parameters": parameters})
    del model, start
    gc.collect()
    release_memory()
    return rows


def release_memory() -> None:
    """Hand the memory freed by the last model back to the system (glibc), so the next model's
    peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


LIBRARY_DIRECTORIES = ("framework", "projectors", "plugins", "objectives")


def failure(error: BaseException) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    frames = traceback.extract_tb(error.__traceback__)
    library = [f for f in frames if Path(f.filename).parent.name in LIBRARY_DIRECTORIES]
    where = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} ({f.name})" for f in library[-1:]]
    if frames:  # and where it raised
        where.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})")
    return {
        "outcome": "fails",
        "reason": f"{type(error).__name__}: {message[:300]}",
        "where": " -> ".join(dict.fromkeys(where)),
        "traceback": traceback.format_exception(error)[-12:],
    }


# -- output ---------------------------------------------------------------------------------
OUTCOMES = ("clean", "backtracked", "did not move", "not clean", "fails", "skipped")
BELOW_PAPER = "gains less than the paper's"
"""Runs whose default teleport raised the gradient norm less than the paper's teleport of the same
model, point and batch (the exact null space at its fixed rate 0.005, :data:`PAPER_MODE`); two
teleports that both stopped on the gain limit landed on the same limit (within the landing band
below it) and count as equal."""


def table(rows: list[dict]) -> str:
    lines = [
        "| family | model | mode | outcome | steps | stopped | batch loss change | gain | paper's gain "
        "| held-out change | sites with room | s | GiB | uncovered | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        measured = "steps" in row
        lines.append(
            "| "
            + " | ".join(
                [
                    row["family"],
                    row["model"],
                    row["mode"],
                    row["outcome"],
                    str(row["steps"]) if measured else "-",
                    row["stopped"] if measured else "-",
                    f"{row['batch_loss_change']:.1e}" if measured else "-",
                    f"{row['gain']:.3g}" if measured else "-",
                    f"{row['paper_gain']:.3g}" if row.get("paper_gain") is not None else "-",
                    f"{row['held_out_change']:.2%}" if measured else "-",
                    f"{row['sites_with_room']}/{row['sites']}" if measured else "-",
                    f"{row['seconds']:.1f}" if measured else "-",
                    f"{row['peak_memory_gib']:.1f}" if row.get("peak_memory_gib") else "-",
                    ", ".join(row.get("uncovered", [])) or "-",
                    row.get("reason", "") or "",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def totals(rows: list[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        key = f"{row['family']} / {row['mode']}"
        count = counts.setdefault(key, dict.fromkeys((*OUTCOMES, BELOW_PAPER), 0))
        count[row["outcome"]] += 1
        count[BELOW_PAPER] += below_paper(row)
    return counts


def below_paper(row: dict) -> bool:
    paper = row.get("paper_gain")
    if paper is None or row.get("gain") is None or row.get("stopped") == row.get("paper_stopped") == "gain":
        return False
    return row["gain"] < paper * (1 - 1e-6)


def totals_table(counts: dict[str, dict[str, int]]) -> str:
    columns = (*OUTCOMES, BELOW_PAPER)
    lines = ["| family / mode | " + " | ".join(columns) + " | models |", "|---" * (len(columns) + 2) + "|"]
    for key, count in counts.items():
        models = sum(count[o] for o in OUTCOMES)
        lines.append(f"| {key} | " + " | ".join(str(count.get(o, 0)) for o in columns) + f" | {models} |")
    return "\n".join(lines)


def library_fingerprint() -> dict[str, Any]:
    """The commit and a digest of the library's sources (uncommitted edits included)."""
    root = Path(tt.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for directory in LIBRARY_DIRECTORIES:
        for path in sorted((root / directory).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *LIBRARY_DIRECTORIES], cwd=root, capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, []
    return {"commit": commit, "uncommitted": [line for line in dirty if line], "sources_sha256": digest.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), help="one family only")
    parser.add_argument("--only", help="only the models whose name contains this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's setting)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "model_coverage.json")
    parser.add_argument(
        "--resume", action="store_true", help="keep the models already in --out (the file is rewritten after each model)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [case for family, make in FAMILIES.items() if args.family in (None, family) for case in make()]
    if args.only:
        cases = [case for case in cases if args.only in case.name]
    library = library_fingerprint()  # of the sources this process imported (at its start)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("torchvision", "timm", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    done: dict[tuple[str, str], list[dict]] = {}
    libraries = [library]
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        for row in previous["rows"]:
            done.setdefault((row["family"], row["model"]), []).append(row)
        libraries += [lib for lib in previous.get("libraries", []) if lib != library]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i, case in enumerate(cases):
        new = done.get((case.family, case.name))
        if new is None:
            case_started = time.perf_counter()
            new = [{**row, "case_seconds": time.perf_counter() - case_started} for row in run_case(case)]
        rows += new
        outcomes = ", ".join(f"{row['mode']}: {row['outcome']}" for row in new)
        print(f"[{i + 1}/{len(cases)}] {case.family} {case.name}: {outcomes} ({new[0]['case_seconds']:.1f}s)", flush=True)
        complete = i + 1 == len(cases)
        wall = sum({(row["family"], row["model"]): row["case_seconds"] for row in rows}.values())
        args.out.write_text(
            json.dumps(
                {
                    "complete": complete,
                    "versions": versions,
                    "libraries": libraries,
                    "threads": torch.get_num_threads(),
                    "seconds": wall,
                    "totals": totals(rows),
                    "rows": rows,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    counts = totals(rows)
    print()
    print(table(rows))
    print()
    print(totals_table(counts))
    wall = sum({(row["family"], row["model"]): row["case_seconds"] for row in rows}.values())
    print(f"\n{len(rows)} runs in {wall:.0f} s (models measured, building included); wrote {args.out}")


if __name__ == "__main__":
    main()
