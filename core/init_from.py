"""Start a run from another run's params (nanoGPT's init_from, big_vision's model_init).

Every param whose path both models have is copied (the same shape is required: a clash is an error
naming it); params only the new model has start fresh (a new head), and the source's other params
are left behind (an old head). The optimizer starts fresh. `init_from_skip` names param paths (or
their prefixes, `head` for head/kernel and head/bias) to leave fresh although both models have them.
"""
import os

import jax

from core import checkpoint
from errors import UserError


def paths(tree) -> dict:
    """{"a/b/c": leaf} of a nested dict."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _skipped(path: str, skip) -> bool:
    return any(path == s.strip("/") or path.startswith(s.strip("/") + "/") for s in skip)


def _steps(cfg) -> tuple[str, list[int], list[int]]:
    """(the source directory, its checkpoint steps newest first, the steps to try: init_from_step, else
    all of them); UserError if it has no checkpoints or not init_from_step. Listed from the directory, so
    that no process waits on the others (Orbax's listing may broadcast)."""
    src = os.path.abspath(os.path.expanduser(cfg.init_from))
    root = checkpoint.ckpt_dir(src)
    if not os.path.isdir(root):
        raise UserError(f"init_from={src} holds no checkpoints; pass the directory of a trained run")
    steps = checkpoint.steps_on_disk(src)
    if cfg.init_from_step is not None and cfg.init_from_step not in steps:
        raise UserError(f"init_from={src} has no checkpoint at step {cfg.init_from_step}; available: {sorted(steps)}")
    return src, steps, steps if cfg.init_from_step is None else [cfg.init_from_step]


def _none_readable(src: str, steps: list[int], tried: list[int]) -> UserError:
    return UserError(f"init_from={src} holds no complete checkpoint; train it first" if not steps else
                     f"init_from={src}: no readable checkpoint (tried steps {tried}); pass init_from_step= a "
                     f"readable one, or another init_from=")


def _source(cfg):
    """(directory, manager, step, meta) of the run to start from: init_from_step, else the newest checkpoint
    whose meta reads (a damaged one is skipped with a warning); UserError if it has no such checkpoint."""
    src, steps, tried = _steps(cfg)
    mngr = checkpoint.manager(src, read_only=True)
    found = checkpoint.first_readable_meta(mngr, tried, f"init_from={src}")
    if found is not None:
        return src, mngr, *found
    mngr.close()
    raise _none_readable(src, steps, tried)


def _check_model(cfg, src: str, src_meta: dict) -> None:
    """UserError if the source run's params cannot start this model."""
    from core.state import saved_config

    src_cfg = saved_config(src_meta["config"])
    if src_cfg.model.family != cfg.model.family:
        raise UserError(f"init_from={src} holds a model={src_cfg.model.family} run, and this run trains "
                        f"model={cfg.model.family}; start from a run of the same family")
    if src_meta.get("compression"):  # int8 params would load as if they were the float ones
        raise UserError(f"init_from={src} is a run compress.py quantized; start from its float source, "
                        f"{src_meta['compression']['source']}")
    src_pos, pos = (c.model.get("pos_emb", "learned") for c in (src_cfg, cfg))
    if src_pos != pos:  # the body's attention would read positions it was not trained with
        raise UserError(f"init_from={src} was trained with model.pos_emb={src_pos}; pass model.pos_emb={src_pos}")


def source_meta(cfg) -> tuple[int, dict]:
    """(step, meta) of the checkpoint to start from: its config, tokenizer, labels are what the data
    inherits. Checked first against this run's model, whose mismatch says more than the data's would.

    Read from the checkpoint's files, not through Orbax, whose reads end in a barrier across processes:
    each process reads its own init_from before they agree that all could (core/distributed.agree)."""
    src, steps, tried = _steps(cfg)
    for s in tried:  # a damaged meta is skipped here, and reported once by load's read through Orbax
        meta = checkpoint.peek_meta(src, s)
        if meta is not None:
            _check_model(cfg, src, meta)
            return s, meta
    raise _none_readable(src, steps, tried)


def with_tokenizer(cfg, inherited: dict | None) -> dict | None:
    """`inherited` plus the WordPiece of data.tokenizer_from=RUN: a run of any family trains on another
    run's tokens (an LSTM on a masked-LM pretraining's), so the two can be distilled or ensembled."""
    path = cfg.data.get("tokenizer_from")
    if not path:
        return inherited
    src = os.path.abspath(os.path.expanduser(path))
    meta = checkpoint.peek_meta(src) if os.path.isdir(checkpoint.ckpt_dir(src)) else None
    if meta is None:
        raise UserError(f"data.tokenizer_from={src} holds no checkpoint; pass the directory of a trained "
                        f"data=text_classify run")
    if "tokenizer" not in meta:
        raise UserError(f"data.tokenizer_from={path} is a run without a subword tokenizer "
                        f"(data={meta['config']['data']['kind']}); name a data=text_classify run")
    if inherited and inherited.get("tokenizer", meta["tokenizer"]) != meta["tokenizer"]:
        raise UserError(f"data.tokenizer_from={path} has another tokenizer than the run init_from or "
                        f"distill.teacher names, whose tokens this run must read: drop data.tokenizer_from")
    return {**(inherited or {}), "tokenizer": meta["tokenizer"]}


def load(cfg, spec, mesh, meta: dict, log) -> dict:
    """The params of a fresh state with every matching param replaced by the source run's."""
    from core.state import run_dims, saved_config, state_spec

    src, mngr, step, src_meta = _source(cfg)
    try:
        src_cfg = saved_config(src_meta["config"])  # source_meta, read first, checked it against the model
        for key in ("vocab", "tokenizer"):
            if key in src_meta and key in meta and src_meta[key] != meta[key]:
                raise UserError(f"init_from={src} was trained with another {key} than this run's data; its "
                                f"embeddings would mean other tokens: train on data with the same {key}")
        # Only a classifier's head means its labels (a masked-LM pretraining's file may have had any).
        if src_meta.get("task") == "classify" and src_meta.get("labels", meta.get("labels")) != meta.get("labels"):
            raise UserError(f"init_from={src} classified labels {src_meta['labels']} and this run's data has "
                            f"{meta.get('labels')}: start from a run of the same labels")
        src_spec = state_spec(src_cfg, run_dims(src_meta), mesh)
        try:  # the newest readable state at or below the meta's step (never the source's newer ones)
            restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(src_spec.abstract, src_spec.shardings),
                                                 step=cfg.init_from_step, newest=step, set_aside=False)
        except UserError as e:
            if not str(e).startswith("no readable checkpoint"):  # e.g. another code version's params: as it is
                raise
            raise UserError(f"init_from={src}: no readable checkpoint at or below step {step}; pass "
                            f"init_from_step= a readable one, or another init_from=") from None
        step = restored[0]
    finally:
        mngr.close()
    source = paths(restored[1]["params"])
    target = paths(spec.abstract["params"])
    skip = list(cfg.init_from_skip)
    unmatched = [s for s in skip if not any(_skipped(p, [s]) for p in target)]
    if unmatched:  # a misspelt path would silently load what it meant to leave fresh
        tops = sorted({p.split("/")[0] for p in target})
        raise UserError(f"init_from_skip: {', '.join(unmatched)} matches no param of this model; name a path or "
                        f"prefix such as {', '.join(tops[:8])}")
    clash = [p for p in target if p in source and not _skipped(p, skip) and source[p].shape != target[p].shape]
    if clash:
        shapes = ", ".join(f"{p} {tuple(source[p].shape)} vs {tuple(target[p].shape)}" for p in clash[:3])
        raise UserError(f"init_from={src}: params differ in shape ({shapes}{' ...' if len(clash) > 3 else ''}); "
                        f"match the model's sizes, or leave them fresh with init_from_skip=[{clash[0]}]")
    loaded = [p for p in target if p in source and not _skipped(p, skip)]
    if not loaded:
        raise UserError(f"init_from={src} shares no param with this model; check model= and init_from_skip")
    fresh = [p for p in target if p not in loaded]
    unused = [p for p in source if p not in target]
    n = sum(target[p].size for p in loaded)
    log(f"init_from {src} step {step}: loaded {len(loaded)} of {len(target)} param tensors ({n:,} values)"
        + (f"; fresh: {', '.join(fresh)}" if fresh else "") + (f"; not used: {', '.join(unused)}" if unused else ""))
    return {p: source[p] for p in loaded}


def merge(params, loaded: dict):
    """`params` with the leaves at `loaded`'s paths replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [loaded.get("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)
