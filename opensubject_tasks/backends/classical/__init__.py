"""Classical CPU backends (OpenCV/numpy, no downloaded weights). Importing this
package imports every module in it, and each module registers its backends."""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
