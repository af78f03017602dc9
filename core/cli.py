"""Command-line front: compose errors and user mistakes become one line on stderr and exit 2."""
import os
import sys

from core import config
from errors import UserError



def fail(error: Exception) -> None:
    """Print `error: ...` and exit at once: 2 for a mistake, 3 for a diverged run."""
    print(f"error: {error}", file=sys.stderr)
    exit_now(getattr(error, "exit_code", 2))


def exit_now(code: int) -> None:
    """Exit with `code` without waiting for stray threads.

    By now `finally` blocks have run (checkpoints flushed, logs closed), and a normal exit would
    wait on non-daemon threads, e.g. a TFDS download pool still retrying offline.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compose_error(config_name: str, overrides: list[str]) -> str | None:
    """None if the overrides compose; else a one-line description of what is wrong and what to do."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    searchpath = any(o.startswith("hydra.searchpath") for o in overrides)  # groups of the user's own
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in ("experiment", "model", "data", "task", "optim") and value and value not in config.choices(key) \
                and not searchpath:
            add = "+" if key == "experiment" and not o.startswith("+") else ""
            return (f"unknown {key} {value!r}; available: {', '.join(config.choices(key))}"
                    + (f" (and write it as +{key}=NAME)" if add else ""))
    try:
        with initialize_config_dir(config_dir=config.CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        return describe(e, config_name)
    if config_name == "train":
        try:
            config.check_keys(cfg)
        except UserError as e:
            return str(e)
    return None


def describe(e: Exception, config_name: str) -> str:
    """One line from Hydra's and OmegaConf's multi-line errors: what is wrong, and where."""
    text = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    where = next((line.split("'")[1] for line in lines if line.startswith("In '")), None)
    if "LexerNoViableAltException" in text or "mismatched input" in text:
        return (f"could not parse the override {text.split(': ', 1)[-1].splitlines()[0]!r}; quote values with "
                f"spaces or special characters, e.g. 'prompt=\"To be\"'")
    if "No match in the defaults list" in text:
        group = text.split("'")[1]
        return f"{group} is not in the defaults list: write +{group}=NAME (available: {', '.join(config.choices(group))})"
    if full_key and ("not in" in text or "Could not override" in text):
        return (f"unknown config key '{full_key}'" + (f" (in {where}.yaml)" if where else "")
                + f"; check its spelling (`python {config_name}.py --cfg job` lists every key)")
    detail = next((line for line in lines if line.startswith(("Value ", "Key ", "Could not", "Invalid"))), lines[0])
    return f"{detail}" + (f" (key '{full_key}')" if full_key else "")


def preflight(config_name: str, argv: list[str]) -> None:
    """Compose once before Hydra runs so a bad override fails with one line (single runs only)."""
    if any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg")
           or a.startswith("-") for a in argv):
        return
    error = compose_error(config_name, [a for a in argv if not a.startswith("hydra.") or a.startswith("hydra.searchpath")])
    if error:
        fail(UserError(error))
