"""Command-line front: compose errors and user mistakes become one line on stderr and exit 2."""
import os
import re
import shlex
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


def shell_arg(key: str, value) -> str:
    """`key=value` as a user pastes it into a shell: quoted for Hydra and the shell where the value holds
    what Hydra parses (a run directory named by its overrides holds `,` and `=`)."""
    value = str(value)
    if not any(c in value for c in ",=[]{}()'\" \\$*?~:;&|<>`!#"):
        return f"{key}={value}"
    hydra_value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if any(c in value for c in "$`\"\\!"):  # what a shell's double quotes would still expand
        return shlex.quote(f"{key}={hydra_value}")
    return f"\"{key}={hydra_value}\""


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
        text = str(e)
        broken = next((p for g in config.PACKAGES for n in config.choices(g)  # its schema was never registered
                       if f"'{g}/{n}_schema'" in text and (p := config.problem(g, n))), None)
        return broken or describe(e, config_name)
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
    if where and where.startswith("experiment/") and (full_key == "experiment" or "@experiment." in text
                                                     or str(full_key).startswith("experiment.")):
        return (f"{where}.yaml puts its keys under experiment.: make its first line `# @package _global_`, "
                f"as every shipped experiment's is")
    unparsed = re.match(r"Error parsing override '(.*)'$", lines[0])
    if unparsed and "=" not in unparsed[1]:  # a bare word: a path meant for out_dir=, or a key without its value
        word = unparsed[1]
        if "/" in word or os.path.exists(word):
            return f"{word!r} is not an override: write key=value, e.g. out_dir={word}"
        return f"the override {word!r} has no value: write {word.lstrip('+~')}=VALUE"
    appended = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if appended:
        return f"{appended[1]} is already in the config: set it without the +, as {appended[1]}=VALUE"
    if "LexerNoViableAltException" in text or "mismatched input" in text or "no viable alternative" in text \
            or unparsed:
        at = re.search(r"no viable alternative at input '(.*)'", text)
        bad = (f"the override {unparsed[1]!r}" if unparsed else f"{at[1]!r} in an override" if at
               else f"the override {text.split(': ', 1)[-1].splitlines()[0]!r}")
        return (f"could not parse {bad}; close its brackets and quotes, and quote values with spaces or special "
                f"characters, e.g. 'prompt=\"To be\"'")
    if "hydra/sweeper/optuna" in text:
        return "the Optuna sweeper is not installed: pip install hydra-optuna-sweeper"
    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing and missing[1] in config.PACKAGES:  # a defaults list names a choice that has no file
        return (f"unknown {missing[1]} {missing[2]!r} (in a defaults list: an experiment's `override /{missing[1]}:`?); "
                f"available: {', '.join(config.choices(missing[1]))}")
    if "No match in the defaults list" in text:
        group = text.split("'")[1]
        return f"{group} is not in the defaults list: write +{group}=NAME (available: {', '.join(config.choices(group))})"
    dotted = re.search(r"Key '([^'.]+)\.([^']+)' not in", text)
    if dotted and where:  # YAML reads `model.x: 1` as one key named "model.x"
        return (f"{where}.yaml sets '{dotted[1]}.{dotted[2]}' as one dotted key, which YAML does not nest; "
                f"write it as `{dotted[1]}:` with `{dotted[2]}: ...` indented on the next line")
    if full_key and ("not in" in text or "Could not override" in text):
        return (f"unknown config key '{full_key}'" + (f" (in {where}.yaml)" if where else "")
                + (_other_choices(full_key)
                   or f"; check its spelling (`python {config_name}.py --cfg job` lists every key)"))
    if full_key and "is not a ListConfig" in text:
        return f"{full_key} takes a list: write {full_key}=[a,b] (brackets, no spaces), or {full_key}=[a] for one"
    detail = next((line for line in lines if line.startswith(("Value ", "Key ", "Could not", "Invalid"))), lines[0])
    return f"{detail}" + (f" (key '{full_key}')" if full_key else "")


def _other_choices(full_key: str) -> str:
    """'; it is a key of model=A or model=B' when other choices of the key's group have it, else ''."""
    group, _, key = full_key.partition(".")
    if group not in config.PACKAGES or not key or "." in key:
        return ""
    having = [n for n in config.usable(group) if key in config.schema_keys(group, n)]
    return f"; it is a key of {' or '.join(f'{group}={n}' for n in having)}: choose that, or drop it" if having else ""


def first_job(overrides: list[str]) -> list[str]:
    """A sweep's overrides with each swept key at its first value: the first job's, to check before any runs.
    UserError for out_dir=, which would put every job in one directory."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        value = o.input_line.split("=", 1)[-1]
        if o.key_or_group == "out_dir" and value not in ("null", "") and "${" not in value:
            raise UserError("out_dir= names one run, and a sweep's jobs each get their own directory: drop it "
                            "(hydra.sweep.dir=DIR chooses where the jobs go, or out_dir='DIR/${seed}' one each)")
        if o.is_sweep_override():  # glob() and search spaces (interval) have no first value: raises, unchecked
            out.append(o.input_line.split("=", 1)[0] + "=" + next(iter(o.sweep_string_iterator())))
        else:
            out.append(o.input_line)
    return out


def _unknown_flag(argv: list[str]) -> tuple[str, str] | None:
    """(the first flag Hydra does not know, the override it likely meant) or None: `--steps 3` is `steps=3`."""
    from hydra._internal.utils import get_args_parser

    known = get_args_parser()._option_string_actions  # argparse also takes a flag's unambiguous prefix
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        known_flag = flag in known or (flag.startswith("--") and any(k.startswith(flag) for k in known))
        if not flag.startswith("-") or flag == "-" or known_flag:
            continue
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if not eq and following and not following.startswith("-") and "=" not in following:
            value = following
        return flag, f"{flag.lstrip('-').replace('-', '_')}={value or 'VALUE'}"
    return None


def preflight(config_name: str, argv: list[str]) -> None:
    """Compose once before Hydra runs so a bad override fails with one line (a sweep: its first job's)."""
    sweep = any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv)
    argv = _without_print_flags(argv)  # `--cfg job` prints the config these overrides compose: check them too
    unknown = _unknown_flag(argv)
    if unknown:
        fail(UserError(f"unknown option {unknown[0]}: settings are key=value overrides, e.g. {unknown[1]} "
                       f"(`python {config_name}.py --help` lists the options)"))
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):  # --help, -cp DIR...
        return
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    overrides = [a for a in overrides if not a.startswith("hydra.") or a.startswith("hydra.searchpath")]
    try:
        overrides = first_job(overrides) if sweep else overrides
    except UserError as e:
        fail(e)
    except Exception:  # noqa: BLE001 - what Hydra cannot parse or list (glob, interval), its own run reports
        return
    error = compose_error(config_name, overrides)
    if error:
        fail(UserError(error))


def _without_print_flags(argv: list[str]) -> list[str]:
    """argv less Hydra's config-printing flags (--cfg/-c WHICH, --package/-p PKG, --resolve)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--cfg", "-c", "--package", "-p"):
            skip = True  # its value follows
        elif a != "--resolve" and not a.startswith(("--cfg=", "--package=")):
            out.append(a)
    return out
