"""Local Loss Landscape Decomposition."""

from __future__ import annotations

from ._l3d import SCHEMA, DIVERGENCES, REFERENCES, Inputs, RankSpec, L3DError, L3DConfigError, L3DInputError, L3DNotFittedError, L3DConfig, batch_topk_mask, L3D, subnetwork_alignment, match_subnetworks

__all__ = ['SCHEMA', 'DIVERGENCES', 'REFERENCES', 'Inputs', 'RankSpec', 'L3DError', 'L3DConfigError', 'L3DInputError', 'L3DNotFittedError', 'L3DConfig', 'batch_topk_mask', 'L3D', 'subnetwork_alignment', 'match_subnetworks']
