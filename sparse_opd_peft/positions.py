"""Coding of coordinates: the sorted flat positions ``i = row * in + col`` of one (out, in) weight, on disk.

Four forms; :func:`pack_coordinates` takes the smallest for each module (ties: the earlier one):

* ``"bitmask"``: ``uint8`` of length ``ceil(out * in / 8)``, bit ``7 - (i % 8)`` of byte ``i // 8`` set when ``i`` is
  a coordinate (numpy ``packbits`` order); one bit per weight entry (format version 1 and 2).
* ``"indices"``: the positions as sorted ``int32`` (``int64`` when ``out * in >= 2**31``): 4 bytes per coordinate
  (format version 1 and 2).
* ``"coded"``, format version 2: one 1-D ``uint8`` stream, self-describing::

      byte 0      codec: 1 = delta-varint, 2 = Elias-Fano
      byte 1      L, the Elias-Fano low-bit width (0 for delta-varint)
      bytes 2..   n, the number of positions, as an LEB128 varint
      payload     delta-varint: n LEB128 varints x[0], x[1] - x[0], ..., x[n-1] - x[n-2]
                  Elias-Fano:   ceil(n * L / 8) bytes: the low L bits of every x[k], most significant bit first,
                                packed back to back; then ceil(U / 8) bytes, U = n + ((out * in - 1) >> L) + 1: bit
                                (x[k] >> L) + k set for every k (numpy ``packbits`` order); padding bits zero

  The stream's length is exact: a truncated stream or trailing bytes are refused.

Elias-Fano costs about ``2 + log2(1 / density)`` bits per coordinate (0.78 bytes at 5 %, 1.07 at 1 %), the bitmask
``1 / density`` bits, so the bitmask wins above ~1/3 density and Elias-Fano below; delta-varint wins for clustered
positions (runs of whole rows: one byte per coordinate). Everything is vectorised (numpy): no Python loop runs per
coordinate.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CODEC_VARINT = 1
CODEC_ELIAS_FANO = 2
CODEC_NAMES = {CODEC_VARINT: "delta-varint", CODEC_ELIAS_FANO: "Elias-Fano"}
COORDINATE_KINDS = ("bitmask", "indices", "coded")
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def index_dtype(numel: int) -> torch.dtype:
    """Smallest signed integer dtype that holds flat indices into a tensor of ``numel`` entries."""
    return torch.int32 if numel < 2**31 else torch.int64


# ---------------------------------------------------------------------------------------------- bitmask
def pack_bitmask(flat_indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Pack sorted flat indices (1-D integer tensor) into a bitmask: 1-D ``uint8`` of length ``ceil(numel / 8)``."""
    bits = torch.zeros(((numel + 7) // 8) * 8, dtype=torch.uint8, device=flat_indices.device)
    bits[flat_indices.long()] = 1
    return (bits.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: 1-D ``uint8`` -> sorted flat indices (1-D ``int64``)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"bitmask must be 1-D uint8 of length {(numel + 7) // 8} for {numel} weight entries, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)).ne(0).reshape(-1)
    if bits[numel:].any():
        raise ValueError("bitmask has bits set past the end of the weight (padding bits must be zero)")
    return bits[:numel].nonzero().squeeze(1)


# ---------------------------------------------------------------------------------------------- LEB128 varints
def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of the LEB128 varint of each value of ``values`` (1-D ``int64`` >= 0): 1-D ``int64``."""
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, 10):  # 9 threshold tests, each over all values
        lengths += values >= (1 << (7 * k))
    return lengths


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 varints (7 bits per byte, least significant group first, high bit = more bytes follow) of ``values``
    (1-D ``int64`` >= 0), concatenated: 1-D ``uint8``."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    lengths = _varint_lengths(values)
    owner = np.repeat(np.arange(values.size), lengths)
    starts = np.cumsum(lengths) - lengths
    byte_no = np.arange(owner.size) - starts[owner]
    out = ((values[owner] >> (7 * byte_no)) & 0x7F).astype(np.uint8)
    out[byte_no < lengths[owner] - 1] |= 0x80
    return out


def varint_decode(payload: np.ndarray, count: int, max_bytes: int) -> np.ndarray:
    """Decode exactly ``count`` LEB128 varints filling ``payload`` (1-D ``uint8``): 1-D ``int64``.

    Raises:
        ValueError: the payload ends inside a varint (truncated), holds more or fewer than ``count`` varints, or a
            varint is longer than ``max_bytes`` bytes.
    """
    last = payload < 0x80
    ends = np.flatnonzero(last)
    if payload.size and not last[-1]:
        raise ValueError("the stream ends inside a varint (truncated)")
    if ends.size != count:
        raise ValueError(f"the stream holds {ends.size} varints, its header says {count} (truncated or padded)")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.size and int(lengths.max()) > max_bytes:
        raise ValueError(f"a varint is {int(lengths.max())} bytes long, more than the {max_bytes} any position needs")
    owner = np.repeat(np.arange(count), lengths)
    byte_no = np.arange(payload.size) - starts[owner]
    out = np.zeros(count, dtype=np.int64)
    for k in range(max_bytes):  # at most 9 passes, each over all bytes of one rank
        sel = byte_no == k
        out[owner[sel]] |= (payload[sel] & 0x7F).astype(np.int64) << (7 * k)
    return out


# ---------------------------------------------------------------------------------------------- stream sizes
def _header(codec: int, low_bits: int, count: int) -> np.ndarray:
    return np.concatenate((np.array([codec, low_bits], dtype=np.uint8), varint_encode(np.array([count]))))


def elias_fano_low_bits(count: int, numel: int) -> int:
    """The Elias-Fano low-bit width for ``count`` positions in ``[0, numel)``: ``floor(log2(numel / count))``."""
    return max(0, (numel // max(count, 1)).bit_length() - 1)


def _elias_fano_payload_bytes(count: int, numel: int, low_bits: int) -> tuple[int, int]:
    """(low part, upper part) byte counts of an Elias-Fano payload."""
    return (count * low_bits + 7) // 8, (count + ((numel - 1) >> low_bits) + 1 + 7) // 8


def _gaps(idx: np.ndarray) -> np.ndarray:
    return np.diff(idx, prepend=np.int64(0)) if idx.size else idx


def _positions_and_gaps(flat_indices: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(positions, gaps) of 1-D integer ``flat_indices`` as contiguous 1-D ``int64`` numpy arrays."""
    idx = np.ascontiguousarray(flat_indices.detach().cpu().long().numpy())
    return idx, _gaps(idx)


def _sizes(gaps: np.ndarray, numel: int) -> dict[str, int]:
    n = int(gaps.size)
    header = 2 + int(_varint_lengths(np.array([n]))[0])
    low = elias_fano_low_bits(n, numel)
    return {
        "bitmask": (numel + 7) // 8,
        "indices": n * torch.empty((), dtype=index_dtype(numel)).element_size(),
        "elias_fano": header + sum(_elias_fano_payload_bytes(n, numel, low)),
        "varint": header + int(_varint_lengths(gaps).sum()),
    }


def coordinate_sizes(flat_indices: torch.Tensor, numel: int) -> dict[str, int]:
    """Bytes each form takes for sorted flat indices (1-D integer tensor) of a weight with ``numel`` entries:
    ``{"bitmask", "indices", "elias_fano", "varint"}`` (the coded streams' headers included)."""
    return _sizes(_positions_and_gaps(flat_indices)[1], numel)


# ---------------------------------------------------------------------------------------------- coded streams
def _elias_fano_encode(idx: np.ndarray, numel: int, low_bits: int) -> np.ndarray:
    n = idx.size
    up_bytes = _elias_fano_payload_bytes(n, numel, low_bits)[1]
    bits = np.empty((n, low_bits), dtype=np.uint8)
    for k in range(low_bits):  # one pass per bit plane (low_bits <= 63), each over all positions
        bits[:, k] = (idx >> (low_bits - 1 - k)) & 1
    upper = np.zeros(up_bytes * 8, dtype=np.uint8)
    upper[(idx >> low_bits) + np.arange(n)] = 1
    return np.concatenate((np.packbits(bits.reshape(-1)), np.packbits(upper))).astype(np.uint8)


def _encode(idx: np.ndarray, gaps: np.ndarray, numel: int, codec: int) -> torch.Tensor:
    if codec == CODEC_ELIAS_FANO:
        low = elias_fano_low_bits(idx.size, numel)
        payload = _elias_fano_encode(idx, numel, low)
    elif codec == CODEC_VARINT:
        low, payload = 0, varint_encode(gaps)
    else:
        raise ValueError(f"unknown position codec {codec!r} (expected {CODEC_VARINT} or {CODEC_ELIAS_FANO})")
    return torch.from_numpy(np.concatenate((_header(codec, low, idx.size), payload)))


def encode_positions(flat_indices: torch.Tensor, numel: int, codec: int) -> torch.Tensor:
    """Code sorted flat indices (1-D integer tensor, strictly increasing, in ``[0, numel)``) as a stream (see the
    module docstring): 1-D ``uint8`` tensor. ``codec`` is :data:`CODEC_VARINT` or :data:`CODEC_ELIAS_FANO`."""
    return _encode(*_positions_and_gaps(flat_indices), numel, codec)


def _read_header(data: np.ndarray, numel: int) -> tuple[int, int, int, int]:
    """(codec, low bits, count, header length) of a stream; ``ValueError`` on a truncated or impossible header."""
    if data.size < 3:
        raise ValueError(f"the stream is {data.size} bytes long, shorter than any header (truncated)")
    codec, low_bits = int(data[0]), int(data[1])
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown position codec {codec} (expected {sorted(CODEC_NAMES)}); a newer format?")
    count, shift, pos = 0, 0, 2
    while True:  # the header's one varint: at most 10 bytes
        if pos >= data.size or pos >= 12:
            raise ValueError("the stream's header ends inside its count (truncated)")
        count |= (int(data[pos]) & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if data[pos - 1] < 0x80:
            break
    if not 1 <= count <= numel:
        raise ValueError(f"the stream's header gives {count} positions for a weight of {numel} entries")
    if codec == CODEC_VARINT and low_bits:
        raise ValueError(f"a delta-varint stream has low-bit width {low_bits}, must be 0")
    if low_bits > max(numel - 1, 1).bit_length():
        raise ValueError(f"Elias-Fano low-bit width {low_bits} is wider than positions below {numel} need")
    return codec, low_bits, count, pos


def _elias_fano_decode(payload: np.ndarray, count: int, numel: int, low_bits: int) -> np.ndarray:
    low_bytes, up_bytes = _elias_fano_payload_bytes(count, numel, low_bits)
    if payload.size != low_bytes + up_bytes:
        state = "truncated" if payload.size < low_bytes + up_bytes else "trailing bytes"
        raise ValueError(f"the Elias-Fano payload is {payload.size} bytes, {count} positions take "
                         f"{low_bytes + up_bytes} ({state})")  # fmt: skip
    low_bits_flat = np.unpackbits(payload[:low_bytes])
    up_bits_count = count + ((numel - 1) >> low_bits) + 1
    upper = np.unpackbits(payload[low_bytes:])
    if low_bits_flat[count * low_bits :].any() or upper[up_bits_count:].any():
        raise ValueError("the Elias-Fano payload has padding bits set (they must be zero)")
    ones = np.flatnonzero(upper)
    if ones.size != count:
        raise ValueError(f"the Elias-Fano upper bits hold {ones.size} ones, the header says {count} positions")
    planes = low_bits_flat[: count * low_bits].reshape(count, low_bits)
    low = np.zeros(count, dtype=np.int64)
    for k in range(low_bits):  # one pass per bit plane
        low = (low << 1) | planes[:, k]
    return ((ones - np.arange(count)) << low_bits) | low


def decode_positions(stream: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_positions`: 1-D ``uint8`` stream -> flat indices (1-D ``int64``; the caller checks
    range and order with :func:`validate_flat_indices`).

    Raises:
        ValueError: not 1-D ``uint8``, truncated, trailing bytes, unknown codec, counts that disagree, padding set.
    """
    if stream.dtype != torch.uint8 or stream.dim() != 1:
        raise ValueError(f"a coded position stream must be 1-D uint8, got {stream.dtype} {tuple(stream.shape)}")
    data = stream.detach().cpu().numpy()
    codec, low_bits, count, start = _read_header(data, numel)
    if codec == CODEC_ELIAS_FANO:
        out = _elias_fano_decode(data[start:], count, numel, low_bits)
    else:
        max_bytes = max(1, math.ceil(max(numel - 1, 1).bit_length() / 7))
        gaps = varint_decode(data[start:], count, max_bytes)
        if int(gaps.max()) >= numel:
            raise ValueError(f"a delta-varint gap of {int(gaps.max())} puts a coordinate out of range [0, {numel})")
        out = np.cumsum(gaps)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------- choose / check
def pack_coordinates(flat_indices: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """The smallest on-disk form of sorted flat indices (1-D integer tensor): ``("bitmask", uint8)``,
    ``("indices", int32 | int64)`` or ``("coded", uint8)`` (:func:`encode_positions`); ties go to the earlier."""
    idx, gaps = _positions_and_gaps(flat_indices)
    sizes = _sizes(gaps, numel)
    best = min(sizes, key=sizes.get)  # the first smallest, in the order of ``sizes``
    if best == "bitmask":
        return "bitmask", pack_bitmask(flat_indices, numel)
    if best == "indices":
        return "indices", flat_indices.to(index_dtype(numel)).contiguous()
    return "coded", _encode(idx, gaps, numel, CODEC_ELIAS_FANO if best == "elias_fano" else CODEC_VARINT)


def validate_flat_indices(indices: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Check that ``indices`` (1-D integer) are in ``[0, numel)``, strictly increasing; return them as int64.

    Raises:
        ValueError: naming ``where`` (module or file) on out-of-range, duplicate or unsorted indices.
    """
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"{where}: coordinates must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    idx = indices.long()
    if idx.numel() == 0:
        raise ValueError(f"{where}: the adapter has no coordinates (empty mask); drop this module from the mask")
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise ValueError(
            f"{where}: coordinate out of range [0, {numel}) (min {int(idx.min())}, max {int(idx.max())}); "
            "the file does not belong to this weight shape"
        )
    steps = idx[1:] - idx[:-1]
    if (steps == 0).any():
        raise ValueError(f"{where}: duplicate coordinates; each weight entry may appear once (re-save the adapter)")
    if (steps < 0).any():
        raise ValueError(f"{where}: coordinates are not sorted ascending (re-save the adapter)")
    return idx


def unpack_coordinates(kind: str, tensor: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Decode a stored ``(kind, tensor)`` pair of :func:`pack_coordinates` into validated sorted flat ``int64``
    indices (1-D).

    Raises:
        ValueError: naming ``where`` (file and module) on any malformed or hostile input.
    """
    if kind not in COORDINATE_KINDS:
        raise ValueError(f"{where}: unknown coordinate encoding {kind!r} (expected one of {COORDINATE_KINDS})")
    try:
        if kind == "bitmask":
            tensor = unpack_bitmask(tensor, numel)
        elif kind == "coded":
            tensor = decode_positions(tensor, numel)
    except ValueError as err:
        raise ValueError(f"{where}: {err}; the file is damaged or was altered: re-save the adapter") from None
    return validate_flat_indices(tensor, numel, where)
