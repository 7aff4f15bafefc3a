"""Pair banks and model inputs: what every other step reads."""

from __future__ import annotations

from ._banks import PairBank
from ._families import check_family, derive_families, differing_variables_family
from ._inputs import (
    Inputs,
    as_model_kwargs,
    concat_inputs,
    index_inputs,
    inputs_len,
    inputs_to,
    min_real_length,
    repeat_inputs,
    sequence_length,
)

__all__ = ['PairBank', 'differing_variables_family', 'check_family', 'derive_families', 'Inputs', 'inputs_len', 'index_inputs', 'concat_inputs', 'repeat_inputs', 'inputs_to', 'as_model_kwargs', 'sequence_length', 'min_real_length']
