"""The compact rows of a teacher cache (format fastkd-teacher-cache/2): a few bits an id.

A row is one counted next-token position: n distinct teacher ids (n <= k) and, per id, either a
log-probability (top-k rows, and rows imported from a server) or a count (sampled rows). The rows
of one packed sequence are written into two bit streams, each starting on a byte (bits LSB first):

    fixed  [top-k rows: every row's header]  then per row: n id low parts (l bits each),
           [top-k rows: n value low parts (r bits each)]
    unary  per row: n id gaps, then n value high parts (top-k) or n counts - 1 (sampled),
           each a run of zeros closed by a one

Ids (Elias-Fano). The row's ids, sorted ascending, id_1 < ... < id_n < V, are split into
low = id mod 2^l, l = floor(log2(V / n)) (0 if V < 2n), kept in l bits, and high = id >> l, whose
gaps high_j - high_(j-1) (high_0 = 0) go to the unary stream. A row costs n (l + 1) + high_n
<= n (l + 1) + V / 2^l < n (log2(V / n) + 3) bits: within ~2 bits an id of log2 C(V, n), what any
code of an n-subset of V needs (at V = 128256, n = 64: 826 bits against 795).

Log-probabilities (top-k rows), with the grid step delta (`step`, nats). The header holds the
row's floor lo = -delta ceil(-min_j lp_j / delta) (values below FLOOR clamp to it), its mass
P = sum_j p_j as x = log(P / (1 - P)) on the same grid (or "P = 1": the ids cover the vocabulary)
and the row's Rice parameter r (3 bits). Each value becomes the code c_j = round((lp_j - lo) /
delta) >= 0: c_j mod 2^r in r bits, c_j >> r in unary; r minimises the row's bits (the codes of a
top-k row are small near the tail, where most of its ids are). Decoding gives lo + c_j delta,
shifted by one constant so that the row's mass is the stored P. Before that shift every value is
within delta / 2 of the exact one (the argmax's code is raised by one if another id shares it, so
the first decoded slot stays the teacher's argmax: 1.5 delta for it); the shift, a weighted mean
of those errors plus P's own rounding (delta / 2), adds at most 2 delta: the error is at most 2.5
delta in log-probability (measured: 1.14 delta at V = 128256, delta = 1/8), and
`bench/cache_size.py` measures the KL it costs.

Counts (sampled rows): c_j >= 1 draws of id_j, sum_j c_j = samples, c_j - 1 in unary: exactly
`samples` bits a row. Decoded as log(c_j / samples), exactly.

A row's fixed bits follow from n (and r, read first from the headers), and the unary stream holds
exactly 2 n ones a row, so a batch of rows decodes with no per-row offsets and no loop over rows:
the ones' positions (nonzero) give every unary value at once. Decoding checks that each sequence
holds its rows' ones, that ids rise and stay below V and that counts add up: a corrupted stream
raises `CorruptRows` (the cache names the file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd.checks import choice, positive_int

FLOOR = -128.0  # log-probabilities below it are stored as FLOOR (p < 3e-56: 0 in fp32)
RICE_BITS = 3  # the header's Rice parameter r in [0, 8)
KINDS = ("logprobs", "counts")


class CorruptRows(ValueError):
    """A stream that does not decode (the cache turns it into an error naming the file)."""


# ---- bits --------------------------------------------------------------------------------------

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor) -> torch.Tensor:
    """uint8 (M,) -> its 8 M bits as uint8 0/1, least significant bit of each byte first."""
    return ((data.reshape(-1, 1) >> _SHIFTS) & 1).reshape(-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack_bits: 0/1 (8 M,) -> uint8 (M,)."""
    return (bits.reshape(-1, 8).to(torch.int32) << _SHIFTS.to(torch.int32)).sum(-1).to(
        torch.uint8)


def _put(bits: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
         widths: torch.Tensor) -> None:
    """Write values[i] in widths[i] bits at bits[offsets[i]:] (fields never overlap)."""
    if offsets.numel() == 0:
        return
    t = torch.arange(int(widths.max()))
    keep = t < widths.unsqueeze(-1)
    bits[(offsets.unsqueeze(-1) + t)[keep]] = ((values.unsqueeze(-1) >> t) & 1)[keep].to(
        torch.uint8)


def _get(bits: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The fields _put wrote: int64 values of widths[i] bits at bits[offsets[i]:]."""
    if offsets.numel() == 0:
        return offsets.clone()
    t = torch.arange(max(int(widths.max()), 1))
    keep = t < widths.unsqueeze(-1)
    pos = (offsets.unsqueeze(-1) + t).clamp_(0, max(bits.numel() - 1, 0))
    return ((bits[pos].long() * keep) << t).sum(-1)


def bit_width(value: int) -> int:
    """Bits that hold 0..value."""
    return max(int(value).bit_length(), 1)


def low_bits(vocab: int, n: torch.Tensor) -> torch.Tensor:
    """Elias-Fano's l = floor(log2(V / n)) (0 when V < 2n) per row, int64."""
    ratio = torch.div(vocab, n.clamp(min=1), rounding_mode="floor").clamp(min=1)
    return torch.floor(torch.log2(ratio.double())).long()


@dataclass(frozen=True)
class Layout:
    """What a cache's rows need to decode: the kind, the vocabulary, the grid, the draws."""

    kind: str  # "logprobs" (top-k / imported rows) or "counts" (sampled rows)
    vocab: int  # ids lie in [0, vocab)
    step: float = 0.125  # logprobs: the grid step delta in nats
    samples: int = 0  # counts: draws per row

    def __post_init__(self) -> None:
        choice("kind", self.kind, KINDS)
        if self.kind == "logprobs" and not 2.0 ** -12 <= self.step <= 1.0:
            raise ValueError(f"logprob_step must lie in [2^-12, 1] nats, got {self.step!r}")
        if self.kind == "counts":
            positive_int("samples", self.samples)

    @property
    def lo_width(self) -> int:
        return bit_width(round(-FLOOR / self.step))

    @property
    def mass_codes(self) -> int:
        """x = log(P / (1 - P)) in [FLOOR, -FLOOR] on the grid: codes 0..mass_codes - 1, and
        mass_codes itself for P = 1."""
        return round(-2 * FLOOR / self.step) + 1

    @property
    def header_width(self) -> int:
        if self.kind == "counts":
            return 0
        return self.lo_width + bit_width(self.mass_codes) + RICE_BITS


# ---- encoding ----------------------------------------------------------------------------------


def _sorted_rows(ids: torch.Tensor, values: torch.Tensor, n: torch.Tensor):
    """Each row's first n slots (the used ones) sorted by id; unused slots after them."""
    width = ids.shape[1]
    used = torch.arange(width) < n.unsqueeze(-1)
    key = torch.where(used, ids.long(), torch.iinfo(torch.int64).max)
    order = key.argsort(dim=-1, stable=True)
    return ids.long().gather(1, order), values.gather(1, order), used


def _value_codes(layout: Layout, lp: torch.Tensor, used: torch.Tensor):
    """(lo code, mass code, value codes c) of top-k rows, lp float64 (R, K) at the used slots."""
    step = layout.step
    lp = lp.clamp(min=FLOOR)
    lowest = torch.where(used, lp, 0.0).amin(-1)
    lo_code = torch.ceil(-lowest / step - 1e-9).clamp(0, round(-FLOOR / step)).long()
    lo = -lo_code.double() * step
    codes = torch.round((lp - lo.unsqueeze(-1)) / step).clamp(min=0).long()
    codes = torch.where(used, codes, 0)
    # the teacher's argmax keeps the highest code alone: raised by one if another id shares it
    top = torch.where(used, lp, float("-inf")).argmax(-1, keepdim=True)
    top_code = codes.gather(1, top)
    shared = ((codes == top_code) & used).sum(-1, keepdim=True) > 1
    codes = codes.scatter(1, top, top_code + shared.long())
    # the row's mass as x = log(P / (1 - P)); P >= 1 (in fp64): the "P = 1" code
    log_mass = torch.logsumexp(torch.where(used, lp, float("-inf")), -1)
    x = log_mass - torch.log(-torch.expm1(log_mass.clamp(max=-1e-300)))
    full = log_mass >= 0
    mass_code = torch.round((x.clamp(FLOOR, -FLOOR) - FLOOR) / step).long()
    mass_code = torch.where(full, layout.mass_codes, mass_code.clamp(0, layout.mass_codes - 1))
    return lo_code, mass_code, codes


def _rice_parameter(codes: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Per row, the r in [0, 2^RICE_BITS) that minimises sum_j (r + (c_j >> r)) bits."""
    r = torch.arange(1 << RICE_BITS)
    cost = ((codes.unsqueeze(-1) >> r) + r) * used.unsqueeze(-1)
    return cost.sum(1).argmin(-1)


def encode(layout: Layout, ids: torch.Tensor, values: torch.Tensor, n: torch.Tensor,
           seq_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode rows, grouped by sequence, into the two streams.

    ids (R, K) integer, the first n[i] slots of row i used (distinct ids in [0, V)); values (R, K):
    log-probabilities (kind "logprobs", finite, <= 0) or counts >= 1 adding up to `samples`
    (kind "counts"); n (R,) >= 1; seq_rows (S,) the rows of each sequence, in order.
    Returns uint8 "fixed" and "unary" with their per-sequence byte offsets (S + 1,) int64.
    """
    n = n.long()
    seq_rows = seq_rows.long()
    ids, values, used = _sorted_rows(ids, values, n)
    rows, width = ids.shape
    l_bits = low_bits(layout.vocab, n)
    high = ids >> l_bits.unsqueeze(-1)
    gaps = torch.diff(torch.where(used, high, 0), dim=1, prepend=torch.zeros(rows, 1,
                                                                              dtype=torch.long))
    fields_off, fields_val, fields_w = [], [], []
    if layout.kind == "logprobs":
        lo_code, mass_code, codes = _value_codes(layout, values.double(), used)
        rice = _rice_parameter(codes, used)
        value_high = codes >> rice.unsqueeze(-1)
        body = n * (l_bits + rice)
    else:
        counts = values.long()
        rice = torch.zeros(rows, dtype=torch.long)
        value_high = torch.where(used, counts - 1, 0)
        body = n * l_bits
    header = layout.header_width
    # fixed stream: per sequence, the headers, then the bodies; each sequence starts on a byte
    seq_of_row = torch.repeat_interleave(torch.arange(len(seq_rows)), seq_rows)
    row_start = torch.cumsum(seq_rows, 0) - seq_rows  # first row of each sequence
    seq_bits = seq_rows * header + torch.zeros(len(seq_rows), dtype=torch.long).index_add_(
        0, seq_of_row, body)
    seq_bytes = (seq_bits + 7) // 8
    fixed_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(seq_bytes, 0)])
    cum = torch.cumsum(body, 0) - body  # each row's body, from the shard's first row's
    body_in_seq = cum - cum[row_start[seq_of_row]] if rows else body
    seq_start = fixed_offsets[:-1][seq_of_row] * 8
    index_in_seq = torch.arange(rows) - row_start[seq_of_row]
    body_off = seq_start + seq_rows[seq_of_row] * header + body_in_seq
    if layout.kind == "logprobs":
        head_off = seq_start + index_in_seq * header
        widths = (layout.lo_width, bit_width(layout.mass_codes), RICE_BITS)
        shift = 0
        for value, w in zip((lo_code, mass_code, rice), widths, strict=True):
            fields_off.append(head_off + shift)
            fields_val.append(value)
            fields_w.append(torch.full_like(value, w))
            shift += w
    slot = torch.arange(width)
    slot_l = l_bits.unsqueeze(-1).expand(rows, width)
    fields_off.append((body_off.unsqueeze(-1) + slot * slot_l)[used])
    fields_val.append((ids & ((1 << slot_l) - 1))[used])
    fields_w.append(slot_l[used])
    if layout.kind == "logprobs":
        slot_r = rice.unsqueeze(-1).expand(rows, width)
        value_off = body_off + n * l_bits
        fields_off.append((value_off.unsqueeze(-1) + slot * slot_r)[used])
        fields_val.append((codes & ((1 << slot_r) - 1))[used])
        fields_w.append(slot_r[used])
    fixed = torch.zeros(int(fixed_offsets[-1]) * 8, dtype=torch.uint8)
    _put(fixed, torch.cat(fields_off), torch.cat(fields_val), torch.cat(fields_w))
    # unary stream: per row, n gaps then n value highs, each as zeros closed by a one
    unary_values = torch.cat([gaps, value_high], 1)[torch.cat([used, used], 1)]
    run_seq = torch.repeat_interleave(seq_of_row, 2 * n)
    run_bits = torch.zeros(len(seq_rows), dtype=torch.long).index_add_(0, run_seq,
                                                                       unary_values + 1)
    unary_offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                               torch.cumsum((run_bits + 7) // 8, 0)])
    ends = torch.cumsum(unary_values + 1, 0)
    seq_first = torch.cumsum(run_bits, 0) - run_bits  # runs before each sequence's first
    ones = unary_offsets[:-1][run_seq] * 8 + ends - 1 - seq_first[run_seq]
    unary = torch.zeros(int(unary_offsets[-1]) * 8, dtype=torch.uint8)
    unary[ones] = 1
    return {"fixed": pack_bits(fixed), "fixed_offsets": fixed_offsets,
            "unary": pack_bits(unary), "unary_offsets": unary_offsets}


# ---- decoding ----------------------------------------------------------------------------------


def decode(layout: Layout, fixed: torch.Tensor, fixed_sizes: torch.Tensor, unary: torch.Tensor,
           unary_sizes: torch.Tensor, n: torch.Tensor, seq_rows: torch.Tensor, width: int):
    """Decode the rows of some sequences: fixed / unary their streams' bytes concatenated (uint8),
    fixed_sizes / unary_sizes (S,) each sequence's byte count, n (R,) the rows' ids, seq_rows (S,)
    the rows of each sequence. Returns (ids int32, logprobs float32), both (R, width), each row
    sorted by log-probability, descending (slot 0: the teacher's argmax for top-k rows); unused
    slots hold id -1 and log-probability 0. Raises CorruptRows if the streams do not decode."""
    n, seq_rows = n.long(), seq_rows.long()
    rows = int(n.numel())
    if int(seq_rows.sum()) != rows:
        raise CorruptRows(f"{int(seq_rows.sum())} rows in the sequences, {rows} row sizes")
    if rows == 0:
        return (torch.empty(0, width, dtype=torch.int32), torch.empty(0, width))
    if int(n.max()) > width or int(n.min()) < 1:
        raise CorruptRows(f"a row holds {int(n.max())} ids, more than {width} (or none)")
    used = torch.arange(width) < n.unsqueeze(-1)
    fixed_bits = unpack_bits(fixed)
    head = _read_fixed(layout, fixed_bits, fixed_sizes.long(), n, seq_rows, used)
    gaps, value_high = _read_unary(unpack_bits(unary), unary_sizes.long(), n, seq_rows, used)
    ids = (torch.cumsum(gaps, 1) << head.l_bits.unsqueeze(-1)) | head.low
    rising = (ids[:, 1:] > ids[:, :-1]) | ~used[:, 1:]
    if not bool(rising.all()) or bool((ids[used] >= layout.vocab).any()):
        raise CorruptRows(f"ids do not rise within a row, or pass the vocabulary ({layout.vocab})")
    lp = _values(layout, fixed_bits, head, value_high, used)
    lp = torch.where(used, lp, float("-inf"))
    order = lp.argsort(dim=-1, descending=True, stable=True)
    ids = torch.where(used, ids, -1).gather(1, order)
    lp = lp.gather(1, order)
    return ids.to(torch.int32), torch.where(ids >= 0, lp, 0.0).float()


@dataclass
class _Fixed:
    """What the fixed stream says of a batch of rows (R rows, width slots)."""

    l_bits: torch.Tensor  # (R,) the ids' low bits l
    low: torch.Tensor  # (R, width) the ids' low parts (0 at unused slots)
    rice: torch.Tensor  # (R,) the Rice parameter r (0 for counts)
    lo_code: torch.Tensor | None  # (R,) the header's floor code (top-k rows)
    mass_code: torch.Tensor | None  # (R,) the header's mass code (top-k rows)
    value_off: torch.Tensor  # (R,) the first bit of each row's value low parts


def _read_fixed(layout: Layout, bits: torch.Tensor, sizes: torch.Tensor, n: torch.Tensor,
                seq_rows: torch.Tensor, used: torch.Tensor) -> _Fixed:
    """The rows' headers and id low parts: each sequence's fixed bits start on its own byte,
    headers first, then the rows' bodies (n low parts of l bits, [n value low parts of r bits])."""
    rows, width = used.shape
    header = layout.header_width
    seq_of_row = torch.repeat_interleave(torch.arange(len(seq_rows)), seq_rows)
    row_start = torch.cumsum(seq_rows, 0) - seq_rows
    index_in_seq = torch.arange(rows) - row_start[seq_of_row]
    fixed_start = (torch.cumsum(sizes, 0) - sizes) * 8
    seq_start = fixed_start[seq_of_row]
    l_bits = low_bits(layout.vocab, n)
    lo_code = mass_code = None
    if layout.kind == "logprobs":
        head_off = seq_start + index_in_seq * header
        lo_w, mass_w = layout.lo_width, bit_width(layout.mass_codes)
        ones_w = torch.ones(rows, dtype=torch.long)
        lo_code = _get(bits, head_off, ones_w * lo_w)
        mass_code = _get(bits, head_off + lo_w, ones_w * mass_w)
        rice = _get(bits, head_off + lo_w + mass_w, ones_w * RICE_BITS)
        body = n * (l_bits + rice)
    else:
        rice = torch.zeros(rows, dtype=torch.long)
        body = n * l_bits
    cum = torch.cumsum(body, 0) - body
    body_off = seq_start + seq_rows[seq_of_row] * header + cum - cum[row_start[seq_of_row]]
    seq_end = fixed_start + seq_rows * header + torch.zeros(len(seq_rows), dtype=torch.long
                                                            ).index_add_(0, seq_of_row, body)
    if bool((seq_end > fixed_start + sizes * 8).any()):
        raise CorruptRows("the fixed stream is shorter than its rows")
    slot = torch.arange(width)
    slot_l = l_bits.unsqueeze(-1).expand(rows, width)
    low = torch.zeros(rows, width, dtype=torch.long)
    low[used] = _get(bits, (body_off.unsqueeze(-1) + slot * slot_l)[used], slot_l[used])
    return _Fixed(l_bits, low, rice, lo_code, mass_code, body_off + n * l_bits)


def _read_unary(bits: torch.Tensor, sizes: torch.Tensor, n: torch.Tensor, seq_rows: torch.Tensor,
                used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(id gaps, value high parts), both (R, width), from the unary stream: 2 n ones a row, each
    closing a run of zeros (a sequence's first run starts at the sequence's first bit)."""
    rows, width = used.shape
    seq_of_row = torch.repeat_interleave(torch.arange(len(seq_rows)), seq_rows)
    ones = torch.nonzero(bits).squeeze(-1)
    unary_start = (torch.cumsum(sizes, 0) - sizes) * 8
    seq_of_one = torch.searchsorted(unary_start, ones, right=True) - 1
    expected = torch.zeros(len(seq_rows), dtype=torch.long).index_add_(0, seq_of_row, 2 * n)
    found = torch.bincount(seq_of_one, minlength=len(seq_rows))
    if not torch.equal(found, expected):
        raise CorruptRows(f"the unary stream holds {found.tolist()[:4]}... ones, its rows need "
                          f"{expected.tolist()[:4]}...")
    previous = torch.cat([ones.new_full((1,), -1), ones[:-1]])
    first = torch.ones_like(ones, dtype=torch.bool)
    first[1:] = seq_of_one[1:] != seq_of_one[:-1]
    previous = torch.where(first, unary_start[seq_of_one] - 1, previous)
    runs = ones - previous - 1
    unary_values = torch.zeros(rows, 2 * width, dtype=torch.long)
    unary_values[torch.cat([used, used], 1)] = runs
    return unary_values[:, :width], unary_values[:, width:]


def _values(layout: Layout, bits: torch.Tensor, head: _Fixed, value_high: torch.Tensor,
            used: torch.Tensor) -> torch.Tensor:
    """(R, width) float64 log-probabilities at the used slots: top-k rows' codes on the grid,
    shifted to the row's stored mass; sampled rows' log(count / samples)."""
    rows, width = used.shape
    if layout.kind == "counts":
        counts = value_high + 1
        if not torch.equal((counts * used).sum(-1), torch.full((rows,), layout.samples)):
            raise CorruptRows(f"a row's counts do not add up to samples={layout.samples}")
        return torch.log(counts.double() / layout.samples)
    slot_r = head.rice.unsqueeze(-1).expand(rows, width)
    value_low = torch.zeros(rows, width, dtype=torch.long)
    value_low[used] = _get(bits, (head.value_off.unsqueeze(-1) + torch.arange(width) * slot_r
                                  )[used], slot_r[used])
    codes = (value_high << head.rice.unsqueeze(-1)) | value_low
    lo = -head.lo_code.double() * layout.step
    lp = lo.unsqueeze(-1) + codes.double() * layout.step
    x = head.mass_code.double() * layout.step + FLOOR
    log_mass = torch.where(head.mass_code >= layout.mass_codes, 0.0,
                           -torch.nn.functional.softplus(-x))  # log sigmoid(x) = log P
    current = torch.logsumexp(torch.where(used, lp, float("-inf")), -1)
    return lp + (log_mass - current).unsqueeze(-1)
