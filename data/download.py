"""TFDS datasets prepared with a deadline: offline, TFDS retries DNS for minutes instead of failing.

The download runs in a child process, so at the deadline it is killed before its partial files
are removed: a thread could not be stopped, and would go on writing after the clean-up.
"""
import glob
import logging
import multiprocessing
import os
import shutil
import sys
import warnings

from errors import UserError, first_line


def prepare(cfg, hint: str):
    """A TFDS builder for `cfg.tfds_name`, downloaded and prepared (array_record) within cfg.download_timeout.

    Raises UserError ending in `hint` (the local-file alternative) when it cannot be.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # offline, it logs every retry
    logging.getLogger("absl").setLevel(logging.ERROR)  # "Variant folder ... has no dataset_info.json": not news
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)
    except Exception as e:  # noqa: BLE001 - an unknown or misspelt dataset name
        raise UserError(f"TFDS has no dataset {cfg.tfds_name!r} ({first_line(e)}); check data.tfds_name, or {hint}") from None
    root = getattr(builder, "_data_dir_root", None) or os.path.dirname(os.path.dirname(builder.data_dir))
    partial_files = lambda: set(glob.glob(os.path.join(root, builder.name, "**", "incomplete.*"), recursive=True)  # noqa: E731
                                 + glob.glob(os.path.join(root, "downloads", "**", "*.tmp.*"), recursive=True))
    before = partial_files()
    # A dataset with configs (glue/sst2) gets <name>/.config/metadata.json and downloads/extracted as
    # soon as its download starts: directories this attempt creates go whole when it fails.
    new_dirs = [d for d in (os.path.join(root, builder.name), os.path.join(root, "downloads"),
                            os.path.join(root, "downloads", builder.name), os.path.join(root, "downloads", "extracted"))
                if not os.path.exists(d)]

    if not builder.is_prepared():
        # fork: the child needs nothing re-imported, and it runs TFDS code only (no JAX).
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        errors = context.Queue()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # JAX's note that fork and threads do not mix
            worker = context.Process(target=_prepare, args=(builder, errors), daemon=True)
            worker.start()
        worker.join(cfg.download_timeout)
        timed_out = worker.is_alive()
        if timed_out:
            worker.kill()
            worker.join()
        error = None if timed_out or errors.empty() else errors.get()
        if timed_out or error or worker.exitcode:
            # Nothing half-written is left behind: this attempt's partial download and preparation go.
            for path in partial_files() - before:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            for d in new_dirs:
                shutil.rmtree(d, ignore_errors=True)
        if timed_out:
            raise UserError(f"TFDS dataset {cfg.tfds_name!r} did not download within "
                            f"{cfg.download_timeout:.0f}s (offline?); {hint}")
        if error or worker.exitcode:
            raise UserError(f"TFDS dataset {cfg.tfds_name!r} could not be prepared "
                            f"({error or f'exit status {worker.exitcode}'}); {hint}")
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)  # reads what the child wrote
    return builder


def _prepare(builder, errors) -> None:
    """The child's work: download and prepare, reporting an error's first line to the parent."""
    try:
        builder.download_and_prepare(file_format="array_record")
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(first_line(e))


def as_str(x) -> str:
    """A TFDS feature value as text: bytes decoded, numbers (class ids) as digits."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    return str(x.item() if hasattr(x, "item") else x)
