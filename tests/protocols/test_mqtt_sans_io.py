"""The codec is sans-I/O: importing it pulls in no event loop, no sockets, no gateway."""

import subprocess
import sys


def test_the_codec_imports_no_io_and_no_gateway() -> None:
    probe = (
        "import sys, protocols.mqtt, protocols.mqtt._microbench\n"
        "loaded = {name.split('.')[0] for name in sys.modules}\n"
        "print(sorted(loaded & {'asyncio', 'socket', 'selectors', 'ssl', 'gateway', 'uvloop'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
