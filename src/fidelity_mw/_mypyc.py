"""mypyc's class marker without mypy_extensions at run time.

Modules that the opt-in mypyc build compiles (docs/compiled.md) mark the classes that
interpreted code subclasses with `mypyc_attr(allow_interpreted_subclasses=True)`. The type
checker, and so mypyc, sees `mypy_extensions.mypyc_attr` here and acts on it at compile time;
compiled classes never call it. Interpreted code calls the no-op below, so neither build
needs mypy_extensions installed.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*attrs, **kwattrs):
        return lambda cls: cls
