"""A neighbour for the decode timings: another process doing PyTorch matmuls on its own threads.

On a machine shared with a second client, a training job or a test run, a call that opens a
parallel region waits at its barrier for threads the scheduler gave to the other process (a
time slice, milliseconds). Decode calls are short enough for that to dominate, so `smartfed
bench` times them again beside such a process: one with as many threads as the machine has cores,
multiplying 1024 x 1024 fp32 matrices in a loop until it is stopped.
"""

import contextlib
import subprocess
import sys

SIZE = 1024
SCRIPT = f"""
import sys
import torch
torch.set_num_threads(int(sys.argv[1]))
a, b, c = torch.randn({SIZE}, {SIZE}), torch.randn({SIZE}, {SIZE}), torch.empty({SIZE}, {SIZE})
torch.mm(a, b, out=c)
print("ready", flush=True)
while True:
    torch.mm(a, b, out=c)
"""
STOP_TIMEOUT_S = 10


@contextlib.contextmanager
def running(threads: int):
    """Within the block, the neighbour computes on ``threads`` threads; yields its description.
    It is stopped on leaving, whatever happens inside."""
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(threads)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        if process.stdout.readline().strip() != "ready":
            process.kill()
            error = process.communicate()[1].strip().splitlines()
            raise RuntimeError(f"the neighbour process did not start (exit status {process.wait()}"
                               f"{': ' + error[-1] if error else ''})")
        yield {"threads": threads, "work": f"torch.mm of {SIZE}x{SIZE} fp32 matrices in a loop"}
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        process.stderr.close()
