"""Knowledge distillation: `distill.teacher=RUN` trains any student against a trained run's outputs.

The training loss is alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * the task's loss
(Hinton et al. 2015; T^2 keeps the soft term's gradients on the hard term's scale), over the same
positions the task scores (every next token, each example's label, the masked tokens). The
teacher's outputs are computed inside the same jitted step: its weights are an argument of the
step, laid out by the mesh rules like the student's, and never trained or checkpointed. Validation
reports the task's own loss, so a distilled student compares with its undistilled twin.

`distill.teacher=[RUN_A,RUN_B,...]` distils an ensemble (Hinton et al.'s first use): the teachers'
probabilities at temperature T are averaged, and the runs may be of different families (an encoder
and an LSTM) as long as they read the same tokens and predict the same classes.

The student's data reads the teacher's vocabulary, tokenizer and labels (as `init_from` does), so
both models see the same token ids and classes.

`distill.augment=P` (text classifiers) adds a second copy of each batch in which every word piece is
replaced by [MASK] or [UNK], or deleted, with probability P (`distill.augment_by`), scored by the
soft term alone (Tang et al. 2019's masking; deletion is EDA's, Wei & Zou 2019). Teachers trained
on the student's own phrases give near one-hot outputs there, which say little beyond the labels;
on texts they never saw their probabilities carry what they know. The alterations are drawn from
the step's key: a pure function of (seed, step), so a resumed run draws the same ones.
"""
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from omegaconf import OmegaConf

from core import checkpoint
from errors import UserError
from model.wordpiece_ids import MASK_ID, UNK_ID, word_deletion, word_dropout
from tasks import WEIGHT

AUGMENT_BY = {"mask": partial(word_dropout, to_id=MASK_ID),  # (ids_BL, key, rate) -> ids_BL
              "unk": partial(word_dropout, to_id=UNK_ID), "delete": word_deletion}


@dataclass
class DistillConfig:
    teacher: Any = None  # a trained run directory, or a list of them (an ensemble); None is off
    teacher_step: Optional[int] = None  # every teacher's checkpoint at this step; None: each one's newest
    alpha: float = 0.5  # the soft (teacher) term's weight; 0 is the task loss alone
    temperature: float = 2.0
    augment: float = 0.0  # text classifiers: an altered copy of each batch, scored by the teachers alone
    augment_by: str = "mask"  # what happens to a picked word piece: mask ([MASK]) | unk ([UNK]) | delete


@dataclass
class Teacher:
    graphdef: tuple  # one per teacher run
    state: list  # one {"params", "rest"} per teacher run, on the student's mesh
    loss: Callable  # (student, batch, key, teachers) -> (loss, metrics): the distillation loss


def enabled(cfg) -> bool:
    return bool(cfg.get("distill")) and bool(teachers(cfg))


def teachers(cfg) -> list[str]:
    """distill.teacher as a list of run directories (one path is one teacher)."""
    t = cfg.distill.get("teacher")
    if t is None or t == "":
        return []
    items = list(t) if OmegaConf.is_list(t) or isinstance(t, (list, tuple)) else [t]
    if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in items):
        raise UserError(f"distill.teacher={t} must be a run directory or a list of them: "
                        f"distill.teacher=RUN or distill.teacher=[RUN_A,RUN_B]")
    return [str(x) for x in items]


def check(cfg, task: str, source_input: str) -> None:
    """distill.* against the run's task and the input its data gives (augment alters words of text)."""
    d = cfg.distill
    if not enabled(cfg):  # reads distill.teacher: a value that names no runs is an error here
        return
    if not 0.0 <= d.alpha <= 1.0:
        raise UserError(f"distill.alpha={d.alpha} must be in [0, 1]")
    if d.temperature <= 0:
        raise UserError(f"distill.temperature={d.temperature} must be positive")
    if not 0.0 <= d.get("augment", 0.0) < 1.0:
        raise UserError(f"distill.augment={d.augment} must be in [0, 1): the share of word pieces altered")
    if d.get("augment_by", "mask") not in AUGMENT_BY:
        raise UserError(f"distill.augment_by={d.augment_by} must be {', '.join(AUGMENT_BY)}")
    if d.get("augment", 0.0) > 0 and (task != "classify" or source_input != "text"):
        raise UserError(f"distill.augment={d.augment} alters the words of texts to classify; this run "
                        f"trains task={task} on {source_input}: drop distill.augment")


def _meta(cfg, path: str) -> tuple[int, dict]:
    """(step, meta) of the teacher's checkpoint (distill.teacher_step, else its newest)."""
    src = os.path.abspath(os.path.expanduser(path))
    found = checkpoint.peek_step_meta(src, cfg.distill.teacher_step)
    if found is None:
        raise UserError(f"distill.teacher={src} holds no checkpoint"
                        + (f" at step {cfg.distill.teacher_step}" if cfg.distill.teacher_step is not None else "")
                        + "; pass the directory of a trained run")
    meta = found[1]
    # The task first, before the data reads the teacher's vocabulary: the likelier mistake.
    if meta.get("task", "lm") != cfg.task.name:
        raise UserError(f"distill.teacher={path} was trained for task={meta.get('task', 'lm')}; "
                        f"this run trains task={cfg.task.name}: distil from a run of the same task")
    return found


def teacher_meta(cfg) -> tuple[dict, list[tuple[int, dict]]]:
    """(the first teacher's checkpoint meta: its data's vocabulary, tokenizer and labels, which the student's
    data reads; (step, meta) of every teacher, which the processes compare); UserError for a teacher
    without one, or an ensemble whose runs read other tokens or classes."""
    paths = teachers(cfg)
    found = [_meta(cfg, path) for path in paths]
    meta = found[0][1]
    # The student's data is built from the first teacher's meta, and every teacher reads its batches:
    # all of what the data contributed (tokenizer, labels, features and scaling, image statistics) must agree.
    inputs = lambda m: {k: v for k, v in m.items() if k not in ("config", "compression")}  # noqa: E731
    want = inputs(meta)
    for path, (_, other_meta) in zip(paths[1:], found[1:]):
        other = inputs(other_meta)
        differ = sorted(k for k in want.keys() | other.keys() if want.get(k) != other.get(k))
        if differ:
            raise UserError(f"distill.teacher: {path} was trained on other data than {paths[0]} ({', '.join(differ)}); "
                            f"an ensemble's teachers must read the same inputs and predict the same classes")
    return meta, found


def check_match(cfg, teacher: dict, student: dict) -> None:
    """The teacher (its meta from teacher_meta: the same task) must predict the student's tokens or classes."""
    name = ",".join(teachers(cfg))
    for key, what in (("vocab", "vocabulary"), ("tokenizer", "tokenizer"), ("labels", "labels"),
                      ("num_classes", "class count")):
        if key in teacher and key in student and teacher[key] != student[key]:
            raise UserError(f"distill.teacher={name} has another {what} than this run's data; distil on the "
                            f"data the teacher was trained on (same text, tokenizer and labels)")
    if teacher.get("dims", {}).get("vocab_size") != student.get("dims", {}).get("vocab_size"):
        raise UserError(f"distill.teacher={name} predicts {teacher['dims'].get('vocab_size')} tokens "
                        f"and this model {student['dims'].get('vocab_size')}: they must share a vocabulary")


def distill_loss(outputs: Callable, alpha: float, temperature: float, augment: float = 0.0,
                 augment_by: str = "mask") -> Callable:
    """(student, batch, key, teachers) -> (loss, metrics) from a task's `outputs` (logits, targets, weights).

    teachers: a model or a sequence of them, whose probabilities at the temperature are averaged.
    augment > 0 (text classifiers, with a key): the soft term of a copy of the batch whose word pieces
    were masked or deleted (AUGMENT_BY[augment_by]) with that probability is added, weighted as the
    soft term is.
    """
    def kl(s_NV, batch, w_N, n, teachers):
        # log of the mean probability, summed one teacher at a time (N x V live, not K x N x V);
        # for one teacher exactly its log-softmax
        t_logp_NV = None
        for t in teachers:
            logp_NV = jax.nn.log_softmax(jax.lax.stop_gradient(outputs(t, batch, None)[0]) / temperature)
            t_logp_NV = logp_NV if t_logp_NV is None else jnp.logaddexp(t_logp_NV, logp_NV)
        t_logp_NV = t_logp_NV - jnp.log(len(teachers))
        s_logp_NV = jax.nn.log_softmax(s_NV / temperature)
        return ((jnp.exp(t_logp_NV) * (t_logp_NV - s_logp_NV)).sum(-1) * w_N).sum() / n

    def loss(student, batch, key, teachers):
        teachers = teachers if isinstance(teachers, (tuple, list)) else (teachers,)
        s_NV, y_N, w_N = outputs(student, batch, key)
        n = jnp.maximum(w_N.sum(), 1.0)
        hard = (optax.softmax_cross_entropy_with_integer_labels(s_NV, y_N) * w_N).sum() / n
        soft = kl(s_NV, batch, w_N, n, teachers)
        total = alpha * soft * temperature ** 2 + (1 - alpha) * hard
        metrics = {"task_loss": hard, "kl": soft, "accuracy": ((s_NV.argmax(-1) == y_N) * w_N).sum() / n,
                   WEIGHT: w_N.sum()}
        if augment > 0 and key is not None:  # fold_in: the student's own dropout keys stay as without it
            altered = dict(batch, x=AUGMENT_BY[augment_by](batch["x"], jax.random.fold_in(key, 101), augment))
            s_aug_NV = outputs(student, altered, jax.random.fold_in(key, 102))[0]
            metrics["kl_augmented"] = kl(s_aug_NV, altered, w_N, n, teachers)
            total = total + alpha * metrics["kl_augmented"] * temperature ** 2
        return total, {"loss": total, **metrics}
    return loss


def load(cfg, mesh, task_module, teachers_meta: dict | None, student_meta: dict, task: str, log) -> Teacher | None:
    """The runs' Teacher, restored onto `mesh`; None without distillation. teachers_meta: teacher_meta's first."""
    if not enabled(cfg):
        return None
    from core.state import load_run

    check_match(cfg, teachers_meta, student_meta)
    if not hasattr(task_module, "outputs"):
        raise UserError(f"task={task} has no logits to distil (distillation covers lm, classify and mlm)")
    graphdefs, states = [], []
    for path in teachers(cfg):
        run = load_run(path, cfg.distill.teacher_step, mesh=mesh)
        n = sum(x.size for x in jax.tree.leaves(run.state["params"]))
        log(f"distilling from step {run.step} of {path} ({run.cfg.model.family}, {n / 1e6:.2f}M params), "
            f"alpha {cfg.distill.alpha}, temperature {cfg.distill.temperature}")
        graphdefs.append(nnx.graphdef(run.model))
        states.append({"params": run.state["params"], "rest": run.state["rest"]})
    return Teacher(tuple(graphdefs), states,
                   distill_loss(task_module.outputs, cfg.distill.alpha, cfg.distill.temperature,
                                cfg.distill.get("augment", 0.0), cfg.distill.get("augment_by", "mask")))
