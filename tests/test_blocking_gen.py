"""The generated blocking surface: in step with the async classes, and the generator itself."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from asyncstage import Manager as AsyncManager
from asyncstage import blocking
from asyncstage.localcloud import LocalCloud as AsyncLocalCloud
from asyncstage.settings import ManagerKeywords
from tests.test_blocking import PAIRS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_blocking.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/gen_blocking.py as a module."""
    spec = importlib.util.spec_from_file_location("gen_blocking", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_blocking"] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_surface_is_what_the_generator_writes() -> None:
    """`make lint` runs this too: change an async class, then run the generator."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_check_fails_on_a_stale_file(
    gen: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    stale = tmp_path / "blocking.py"
    stale.write_text((ROOT / "asyncstage" / "blocking.py").read_text())
    monkeypatch.setattr(gen, "OUTPUT", stale)
    assert gen.main(["--check"]) == 0
    stale.write_text(stale.read_text().replace("def dd(", "def copy_blocks(", 1))
    assert gen.main(["--check"]) == 1
    assert "is stale: run python scripts/gen_blocking.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


@pytest.mark.parametrize(("async_cls", "blocking_cls"), PAIRS, ids=lambda c: c.__name__)
def test_signatures_and_docstrings_are_copied(
    async_cls: type[Any], blocking_cls: type[Any]
) -> None:
    """Each generated method has the async parameters (names, kinds, defaults) and the
    async docstring; each property the async property's docstring."""
    checked = 0
    for name, member in vars(async_cls).items():
        twin = inspect.getattr_static(blocking_cls, name, None)
        code = twin.fget if isinstance(twin, property) else twin
        if getattr(code, "__module__", None) != blocking.__name__:
            continue  # not twinned, or hand-written in the runtime
        if isinstance(member, property):
            assert isinstance(twin, property), name
            assert twin.__doc__ == member.__doc__, name
        elif inspect.isfunction(member) and name != "__init__":
            want = inspect.signature(member).parameters.values()
            have = inspect.signature(twin).parameters.values()
            assert [(p.name, p.kind, p.default) for p in have] == [
                (p.name, p.kind, p.default) for p in want
            ], name
            assert inspect.getdoc(twin) == inspect.getdoc(member), name
        else:
            continue
        checked += 1
    assert checked >= 5


def test_types_name_the_blocking_classes() -> None:
    sig = inspect.signature(blocking.Manager.start_servers)
    assert sig.parameters["servers"].annotation == "Iterable[Server]"
    assert sig.return_annotation == "list[Server]"
    assert inspect.signature(blocking.Volume.mount).parameters["server"].annotation == (
        "Server | None"
    )
    assert inspect.signature(blocking.Server.provision_volume).return_annotation == "Volume"
    server = inspect.getattr_static(blocking.Volume, "server")
    assert inspect.signature(server.fget).return_annotation == "Server | None"
    # constructor options go to the async Manager unchanged: classes stay async there
    option = blocking.ManagerOptions.__annotations__["server_class"]
    assert option.__forward_arg__ == "type[_AsyncServer]"
    # aliases stay aliases
    assert blocking.Volume.snapshot is blocking.Volume.create_snapshot


def test_constructor_options_are_the_keyword_arguments() -> None:
    """``ManagerOptions`` extends ``ManagerKeywords`` (the keys of ``**settings``) with the
    named parameters, in order; ``LocalCloudOptions`` has the named parameters."""
    params = [p for p in inspect.signature(AsyncManager.__init__).parameters if p != "self"]
    assert params[-1] == "settings"
    params = list(ManagerKeywords.__annotations__) + params[:-1]
    assert list(blocking.ManagerOptions.__annotations__) == params
    cloud = [p for p in inspect.signature(AsyncLocalCloud.__init__).parameters if p != "self"]
    assert list(blocking.LocalCloudOptions.__annotations__) == cloud
    assert blocking.LocalCloudOptions.__optional_keys__ == set(cloud)


ASYNC_SOURCE = '''
from __future__ import annotations

from collections.abc import Sequence

from asyncstage.manager import Manager
from asyncstage.server import Server
from asyncstage.volume import Volume

LIMIT = 3


class GrownManager(Manager):
    """A Manager that gained arguments and members since the surface was generated."""

    def __init__(self, *, region: str | None = None, retries: int = LIMIT) -> None:
        super().__init__(region=region)
        self.retries = retries
        """How often to try."""
        self.limit = LIMIT
        self.spare = self.ec2.region or None
        if retries:
            self.mode = "eager"
        else:
            self.mode = None

    async def clone(
        self, source: Volume, targets: Sequence[Server], *, into: Server | None = None
    ) -> dict[str, Volume]:
        """Clone ``source`` onto each server."""
        return {}
'''


@pytest.fixture
def grown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[Any]:
    (tmp_path / "grown_async.py").write_text(ASYNC_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grown_async", None)
    return importlib.import_module("grown_async").GrownManager  # type: ignore[no-any-return]


def test_a_grown_async_class_is_generated_without_editing_the_generator(
    gen: ModuleType, grown: type[Any]
) -> None:
    target = gen.Target(
        "Manager",
        "grown_async:GrownManager",
        "grown_async.GrownManager",
        "_ManagerLifetime",
        "Doc.",
        constructor="options",
    )
    writer = gen.Writer(target, gen.Imports())
    options = "\n".join(writer.options())
    assert "    region: str | None\n    retries: int" in options
    code = gen.format_code("\n".join(writer.write()))
    assert "def clone(\n        self, source: Volume, targets: Sequence[Server]," in code
    assert "into: Server | None = None\n    ) -> dict[str, Volume]:" in code
    # a method's docstring is the async one's, given at import (_register): not copied
    assert "Clone ``source``" not in code
    # the list of servers is passed on as a list (unwrapped on the loop), the dict wrapped
    flat = " ".join(code.split())
    assert (
        'return cast( "dict[str, Volume]", '
        "_wrap(_call_async(self._async.clone, source, list(targets), into=into)), )"
    ) in flat
    # attributes: an annotated parameter, a module constant, `x or None`, set in branches
    assert "def retries(self) -> int:\n        " + '"""How often to try."""' in code
    assert "def limit(self) -> int:" in code
    assert "def spare(self) -> str | None:" in code
    assert "def mode(self) -> str | None:" in code


def test_what_cannot_be_inferred_is_reported(
    gen: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = ASYNC_SOURCE.replace("self.limit = LIMIT", "self.limit = [LIMIT]")
    (tmp_path / "grown_async.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grown_async", None)
    importlib.import_module("grown_async")
    target = gen.Target("Manager", "grown_async:GrownManager", "g", "_ManagerLifetime", "D.")
    with pytest.raises(gen.GenError, match=r"\[LIMIT\]: cannot infer the type; annotate it"):
        list(gen.Writer(target, gen.Imports()).write())
