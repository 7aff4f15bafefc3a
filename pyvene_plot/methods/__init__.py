"""Methods of PLOT's source papers beside PLOT: Optimal Ablation, PCA/LIB bases, attribution patching, L3D.

Each lives in its own module or subpackage and is imported on first use (``import pyvene_plot.methods.l3d``).
"""
