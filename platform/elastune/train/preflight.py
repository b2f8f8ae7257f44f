"""What a run settles before any worker starts, each as an event the console shows and the run
directory keeps: the checkpoint root (a lease taken over, what --fresh deleted), the data (token
windows prepared now) and the resume (the step, and which spec fields changed since)."""

from __future__ import annotations

import time
from typing import Any

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.lease import Lease
from elastune.data.prepare import OnProgress, ensure_prepared
from elastune.data.tokenize import BYTES
from elastune.errors import DataError
from elastune.events import DataPrepared, Event, Fresh, LeaseTakenOver, Resume, RunWarning
from elastune.recipes import Recipe
from elastune.spec.models import JobSpec, RecipeModel
from elastune.train.resume import ResumePlan


def settle_root(ckpt: Checkpointer, lease: Lease, fresh: bool) -> list[Event]:
    """The root's lease taken over from a holder that is gone; with `fresh`, its checkpoints deleted."""
    out: list[Event] = []
    if lease.took_over is not None:
        gone = lease.took_over.describe(time.time())
        out.append(LeaseTakenOver(time=time.time(), message=f"Took over the checkpoint root from {gone}, which is gone."))
    if fresh:
        removed = ckpt.clear()
        if removed:
            message = f"--fresh: deleted {removed} checkpoint(s) at {ckpt.uri}; starting over."
            out.append(Fresh(time=time.time(), deleted=removed, message=message))
        out += [RunWarning(time=time.time(), message=f"--fresh: {left}") for left in ckpt.notes]
    return out


def prepare_data(
    spec: JobSpec, recipe: Recipe, saved: dict[str, Any] | None = None, on_progress: OnProgress | None = None
) -> list[Event]:
    """Token windows for a recipe that reads them, prepared now if they are not yet; an `eval`
    section needs them, with a held-out split, the byte-level GPT needs byte tokens, and a run
    resuming a checkpoint (`saved`: the identity of the data it trained on) needs the tokenizer it
    trained with (DataError, exit 2, otherwise)."""
    if recipe.dataset is not None:
        if spec.eval is not None:
            raise DataError(
                "eval reads the held-out windows of a prepared dataset, but this model's recipe brings its own dataset; "
                "remove the eval section or use prepared token windows (data.path, data.source)"
            )
        return []
    manifest, prepared_now = ensure_prepared(spec.data, on_progress)
    if isinstance(spec.model, RecipeModel) and spec.model.recipe == "byte_gpt" and manifest.tokenizer != BYTES:
        raise DataError(
            f"model.recipe {spec.model.recipe} reads byte tokens (vocabulary 256), but the dataset at {spec.data.path} "
            f"holds {manifest.tokenizer} tokens (vocabulary {manifest.vocab_size:,}); prepare it with --tokenizer bytes "
            f"(data.tokenizer: bytes), or use model.recipe gpt, whose vocabulary is the dataset's"
        )
    trained_with = (saved or {}).get("tokenizer_hash")
    if saved is not None and trained_with != manifest.tokenizer_hash:
        raise DataError(
            f"the checkpoint was trained on tokens of another tokenizer (tokenizer sha256 {str(trained_with)[:16]}) than "
            f"the dataset at {spec.data.path} holds ({str(manifest.tokenizer_hash)[:16]}): the same ids would mean other "
            f"text; prepare the data with the checkpoint's tokenizer, or start over with --fresh"
        )
    if spec.eval is not None and manifest.eval_fraction is None:
        raise DataError(
            f"eval needs held-out documents, but the dataset at {spec.data.path} has no held-out split; prepare it "
            f"again with --eval-fraction, or set data.eval_fraction and data.source so the run prepares it"
        )
    if not prepared_now:
        return []
    message = f"Prepared {manifest.count:,} samples of {manifest.window} tokens at {spec.data.path}."
    return [DataPrepared(time=time.time(), count=manifest.count, content_hash=manifest.content_hash, message=message)]


def resuming(resume: ResumePlan, uri: str) -> Resume:
    changed = f"; these fields differ from the spec that saved it: {'; '.join(resume.changes)}" if resume.changes else ""
    message = (
        f"Resuming from checkpoint step {resume.step} ({resume.samples_seen:,} samples) at {uri}{changed}; "
        f"pass --fresh to start over."
    )
    return Resume(
        time=time.time(), step=resume.step, samples_seen=resume.samples_seen, changes=tuple(resume.changes), message=message
    )
