"""Zero-filled device buffers that outlive the calls using them: the split-K workspace, arrival
counts, stand-ins for absent operands. Kernels that write one leave it zero again, so a CUDA graph
replays it as it was captured.

One buffer per (name, dtype, device, columns), handed out as a view of its first rows and grown on
demand (warm up at the largest size before a graph capture). An outgrown buffer is kept, not
freed: a graph captured earlier may still read it.
"""

_buffers: dict = {}
_outgrown: list = []


def zeros(name: str, rows: int, cols: int, dtype, device):
    """A zero [rows, cols] view of the cached buffer `name`."""
    import torch

    key = (name, dtype, device, cols)
    buf = _buffers.get(key)
    if buf is None or buf.shape[0] < rows:
        if buf is not None:
            _outgrown.append(buf)
        buf = _buffers[key] = torch.zeros(max(rows, 64), cols, dtype=dtype, device=device)
    return buf[:rows]
