"""The codec is sans-I/O: importing it pulls in no event loop, no sockets, no gateway."""

import subprocess
import sys


def test_the_codec_imports_no_io_and_no_gateway() -> None:
    # Compare before and after the import: a coverage tracer in the child may load modules
    # of its own before the probe runs.
    probe = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import protocols.mqtt, protocols.mqtt._microbench\n"
        "loaded = {name.split('.')[0] for name in set(sys.modules) - before}\n"
        "print(sorted(loaded & {'asyncio', 'socket', 'selectors', 'ssl', 'gateway', 'uvloop'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
