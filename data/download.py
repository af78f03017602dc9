"""TFDS datasets prepared with a deadline: offline, TFDS retries DNS for minutes instead of failing."""
import glob
import logging
import os
import shutil
import threading

from errors import UserError, first_line


def prepare(cfg, hint: str):
    """A TFDS builder for `cfg.tfds_name`, downloaded and prepared (array_record) within cfg.download_timeout.

    Raises UserError ending in `hint` (the local-file alternative) when it cannot be.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # offline, it logs every retry
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)
    except Exception as e:  # noqa: BLE001 - an unknown or misspelt dataset name
        raise UserError(f"TFDS has no dataset {cfg.tfds_name!r} ({first_line(e)}); check data.tfds_name, or {hint}") from None
    error: list[BaseException] = []
    root = getattr(builder, "_data_dir_root", None) or os.path.dirname(os.path.dirname(builder.data_dir))
    partial_files = lambda: set(glob.glob(os.path.join(root, builder.name, "**", "incomplete.*"), recursive=True)  # noqa: E731
                                 + glob.glob(os.path.join(root, "downloads", "**", "*.tmp.*"), recursive=True))
    before = partial_files()
    new_dirs = [d for d in (os.path.join(root, builder.name), os.path.join(root, "downloads", builder.name))
                if not os.path.exists(d)]

    def run():
        try:
            builder.download_and_prepare(file_format="array_record")
        except BaseException as e:  # noqa: BLE001 - reported to the main thread below
            error.append(e)

    # A daemon thread, so a hung download cannot keep the process alive past the deadline.
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(cfg.download_timeout)
    if worker.is_alive() or error:
        # Nothing half-written is left behind: TFDS's partial download and preparation of this attempt go.
        for path in partial_files() - before:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        for d in new_dirs:
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
    if worker.is_alive():
        raise UserError(f"TFDS dataset {cfg.tfds_name!r} did not download within "
                        f"{cfg.download_timeout:.0f}s (offline?); {hint}")
    if error:
        raise UserError(f"TFDS dataset {cfg.tfds_name!r} could not be prepared ({first_line(error[0])}); {hint}")
    return builder
