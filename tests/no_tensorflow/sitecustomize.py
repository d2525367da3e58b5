import importlib.machinery as _machinery

_find = _machinery.PathFinder.find_spec
def _find_spec(cls, fullname, path=None, target=None):
    if fullname == "tensorflow" or fullname.startswith("tensorflow."):
        return None
    return _find(fullname, path, target)
_machinery.PathFinder.find_spec = classmethod(_find_spec)
