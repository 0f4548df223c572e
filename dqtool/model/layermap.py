"""Which teacher layers a shallower student copies.

Two published schemes are built in:

* ``sft`` (default) — "shrink and fine-tune" (Shleifer & Rush, 2020, the distilBART
  maps): spread the kept layers over the stack, always keeping the first and last.
  12→6 keeps 0,2,4,7,9,11; 6→3 keeps 0,2,5; a 1-layer student keeps layer 0.
* ``dqbart`` — the maps of the DQ-BART authors' code for 6-layer BART-base stacks:
  6→1 keeps the *last* layer (5), 6→2 keeps 0,5, 6→3 keeps 0,2,5, 6→4 keeps 0,2,3,5,
  6→5 keeps 0,1,3,4,5.

For depths neither table lists, both fall back to evenly spaced layers that include
the first and the last (a 1-layer student: first for sft, last for dqbart). Any
explicit map is accepted as long as its length is the student depth and every index
exists in the teacher.

One rule overrides both tables: a **1-layer decoder copies the teacher's last decoder
layer** (DQ-BART's 6→1 choice), under either scheme. The last decoder layer is the one
whose output the LM head reads; a single-layer decoder started from the first layer must
relearn that interface. Measured on the demo teacher (3+3, `benchmarks/RESULTS.md`,
teacher C, 2-2-8 learned ternary, 300 QAT steps, seeds 42/1/2): a 3+1 student copying
decoder layer 2 scores ROUGE-L 19.14 ± 0.77 against 15.18 ± 0.32 copying layer 0 (layer
1: 17.30, one seed). A 1-layer *encoder* keeps the table's choice (layer 0 under sft).
"""

from __future__ import annotations

from dqtool.base.errors import DQToolError

SCHEMES = ("sft", "dqbart")

# teacher depth -> student depth -> teacher layers to copy
_SFT: dict[int, dict[int, list[int]]] = {
    12: {1: [0], 2: [0, 6], 3: [0, 6, 11], 4: [0, 4, 8, 11], 6: [0, 2, 4, 7, 9, 11],
         9: [0, 1, 2, 4, 5, 7, 9, 10, 11]},
    16: {1: [0], 2: [0, 15], 3: [0, 8, 15], 4: [0, 5, 10, 15], 6: [0, 3, 6, 9, 12, 15],
         8: [0, 2, 4, 6, 8, 10, 12, 15], 9: [0, 1, 3, 5, 7, 9, 11, 13, 15],
         12: [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15]},
    6: {1: [0], 2: [0, 5], 3: [0, 2, 5], 4: [0, 1, 3, 5]},
}
_DQBART: dict[int, dict[int, list[int]]] = {
    6: {1: [5], 2: [0, 5], 3: [0, 2, 5], 4: [0, 2, 3, 5], 5: [0, 1, 3, 4, 5]},
}


def _even(n_teacher: int, n_student: int) -> list[int]:
    # Evenly spaced, first and last included: i * (n-1) / (m-1), rounded.
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def default_map(n_teacher: int, n_student: int, scheme: str = "sft", stack: str = "encoder") -> list[int]:
    """Teacher layer indices for a student ``stack`` (encoder or decoder) of ``n_student`` layers.

    Example:
        >>> default_map(12, 6)
        [0, 2, 4, 7, 9, 11]
        >>> default_map(6, 1, "dqbart")
        [5]
        >>> default_map(12, 1), default_map(12, 1, stack="decoder")
        ([0], [11])
        >>> default_map(8, 3)
        [0, 4, 7]
    """
    if scheme not in SCHEMES:
        raise DQToolError(f"unknown layer-map scheme '{scheme}': choose one of {', '.join(SCHEMES)}")
    if n_student < 1:
        raise DQToolError(f"a student needs at least 1 layer per stack, got {n_student}")
    if n_student > n_teacher:
        raise DQToolError(
            f"the student cannot have more layers ({n_student}) than the teacher ({n_teacher}); "
            f"choose at most {n_teacher}")
    if n_student == n_teacher:
        return list(range(n_teacher))
    if n_student == 1 and stack == "decoder":   # the layer the LM head reads (see the module docstring)
        return [n_teacher - 1]
    table = _SFT if scheme == "sft" else _DQBART
    if n_teacher in table and n_student in table[n_teacher]:
        return list(table[n_teacher][n_student])
    if n_student == 1:
        return [0] if scheme == "sft" else [n_teacher - 1]
    return _even(n_teacher, n_student)


def parse_map(text: str) -> list[int]:
    """Parse ``"0,2,5"`` into ``[0, 2, 5]`` (a DQToolError for anything else).

    Example:
        >>> parse_map(" 0, 2,5 ")
        [0, 2, 5]
    """
    try:
        out = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError as e:
        raise DQToolError(f"layer map '{text}' is not a comma-separated list of layer indices, e.g. 0,2,5") from e
    if not out:
        raise DQToolError("a layer map needs at least one layer index, e.g. 0,2,5")
    return out


def check_map(layer_map: list[int], n_teacher: int, stack: str) -> list[int]:
    """Validate an explicit map against the teacher's depth; return it as a list.

    Example:
        >>> check_map([0, 9], 6, "encoder")
        Traceback (most recent call last):
        ...
        dqtool.base.errors.DQToolError: encoder map index 9 is out of range: the teacher encoder has layers 0..5
    """
    for idx in layer_map:
        if not 0 <= idx < n_teacher:
            raise DQToolError(
                f"{stack} map index {idx} is out of range: the teacher {stack} has layers 0..{n_teacher - 1}")
    return list(layer_map)
