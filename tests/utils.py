"""Helpers shared by the test modules."""

import copy
import io
import pickle

import torch


def roundtrip(module):
    """Copies of ``module`` made by deepcopy, pickle and torch.save/torch.load."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return [copy.deepcopy(module), pickle.loads(pickle.dumps(module)), torch.load(buffer, weights_only=False)]


def compiled(fn):
    """torch.compile with a fresh dynamo cache, so each test compiles its own graph."""
    torch._dynamo.reset()
    return torch.compile(fn)


def to_numpy(t):
    return t.detach().double().cpu().numpy()
