"""Read PyTorch checkpoints (`torch.save`'s zip format) and safetensors files into numpy, without torch.

torch.save (since 1.6) writes a zip: `<name>/data.pkl` pickles the object, and each tensor's storage is
the raw little-endian bytes of `<name>/data/<key>`, named from the pickle by a persistent id
('storage', StorageType, key, location, numel). `pytorch_model.bin` is the same format. The unpickler
here runs no code from the file: it knows the few globals a tensor needs, and anything else the pickle
names (an optimizer's or a config's classes) loads as an inert `Opaque` placeholder, so a model's
state dict can be read from a checkpoint that holds more than we understand. safetensors is an 8-byte
little-endian header length, a JSON header, then the raw bytes.
"""
import builtins
import collections
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from errors import UserError, first_line

STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
SAFETENSORS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
               "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class Opaque:
    """Something a pickle built from a global we do not load (an optimizer's class, `os.system`): kept inert."""

    def __init__(self, *args, **kwargs):
        self.args, self.items = args, {}

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # a dict subclass's items
        self.items[key] = value

    def append(self, value):  # a list subclass's items
        self.items[len(self.items)] = value

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self):
        return f"<{type(self).__name__}>"


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *rest):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied out as an array."""
    if isinstance(storage, Opaque):
        return storage
    size, stride = tuple(size), tuple(stride)
    if size and (offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size or min(size) < 0):
        raise ValueError(f"a tensor of shape {size} lies outside its storage of {storage.size} values")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),  # protocol 2's bytes
    **{("builtins", n): getattr(builtins, n)
       for n in ("set", "frozenset", "slice", "complex", "tuple", "list", "dict")},
    **{("torch", name): _StorageType(name) for name in STORAGES},
}


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only GLOBALS and Opaque placeholders; storages come from `load`."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self.load_storage = load_storage

    def find_class(self, module, name):
        found = GLOBALS.get((module, name))
        return found if found is not None else type(f"{module}.{name}", (Opaque,), {})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.60}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType):
            return Opaque(storage_type)  # a storage of a kind we do not read
        return self.load_storage(str(key), STORAGES[storage_type.name])


def _corrupt(path: str, what: str, e: Exception) -> UserError:
    return UserError(f"{path} is not a readable {what} ({type(e).__name__}: {first_line(e, 120)}); it may be "
                     f"truncated or damaged: copy or save it again")


def read_torch(path: str):
    """The object torch.save wrote to `path`, its tensors as numpy arrays (bfloat16 as ml_dtypes.bfloat16)."""
    if not os.path.isfile(path):
        raise UserError(f"path={path} {'is a directory' if os.path.isdir(path) else 'does not exist'}; pass the "
                        f"checkpoint file (nanoGPT's ckpt.pt)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a PyTorch zip checkpoint: it is truncated, or was saved by torch < 1.6 in "
                        f"the legacy format (load it in torch and torch.save it again)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise UserError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl inside)")
            root = pkl[: -len("data.pkl")]
            big = zf.read(root + "byteorder").strip() == b"big" if root + "byteorder" in names else False
            cache = {}

            def load_storage(key: str, dtype):
                if key not in cache:
                    raw = np.frombuffer(zf.read(f"{root}data/{key}"), dtype)
                    cache[key] = raw.byteswap() if big else raw
                return cache[key]

            with zf.open(pkl) as f:
                return _Unpickler(f, load_storage).load()
    except UserError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError, IndexError,
            AttributeError, struct.error, OSError, RecursionError) as e:
        raise _corrupt(path, "PyTorch checkpoint", e) from None


def read_pickle(path: str):
    """A plain pickle (nanoGPT's meta.pkl), loaded without running code: classes load as Opaque."""
    if not os.path.isfile(path):
        raise UserError(f"meta={path} does not exist; pass the dataset's meta.pkl (nanoGPT: data/<dataset>/meta.pkl)")
    try:
        with open(path, "rb") as f:
            return _Unpickler(f, lambda *a: None).load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, AttributeError, KeyError,
            struct.error, RecursionError) as e:
        raise _corrupt(path, "pickle", e) from None


def read_safetensors(path: str) -> dict:
    """{name: array} of a safetensors file."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        data = np.memmap(path, np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = np.dtype(SAFETENSORS[entry["dtype"]]), tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if end > data.size or end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"tensor {name} ({end - begin} bytes at {begin}) does not fit the file")
            out[name] = np.array(data[begin:end].view(dtype).reshape(shape))
        return out
    except (struct.error, ValueError, KeyError, TypeError, OSError) as e:
        raise _corrupt(path, "safetensors file", e) from None
