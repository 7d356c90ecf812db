"""Classical CPU backends (OpenCV/numpy, no downloaded weights). Each module is named after
the interface it serves and registers its backends when imported; the registry imports
only the one it is asked for (a curation run loads the quality scorer, not SciPy and
scikit-image for the detector)."""
