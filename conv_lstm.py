"""The convolutional LSTM cell of the GQN cores (Eslami et al. 2018, supplementary fig. S2 and its equations).

The paper's cell, with 5x5 convolutions over the concatenation [input, h]:
    f = σ(W_f * [input, h]),  i = σ(W_i * [input, h]),  o = σ(W_o * [input, h]),  s = tanh(W_s * [input, h])
    c' = f ⊙ c + i ⊙ s,  h' = o ⊙ tanh(c')
The four gate convolutions are one convolution with 4·hidden output channels (order f, i, o, s), and the cell
takes a second addend for the gate pre-activations, `gates_in`: the cores compute the share of their
step-invariant inputs (x_q, v_q, r) once per forward pass, because a convolution of a concatenation is the sum
of the convolutions of its parts.
"""
import torch
import torch.nn.functional as F
from torch import nn


def lstm_update(gates, c=None):
    """Gate pre-activations (B, 4*hidden, H, W), order f, i, o, s, and c (None = zero state) -> (c', h')."""
    f, i, o, s = gates.chunk(4, 1)
    c_new = torch.sigmoid(i) * torch.tanh(s)
    if c is not None:  # the initial state c = 0 contributes nothing; skip its product
        c_new = torch.sigmoid(f) * c + c_new
    return c_new, torch.sigmoid(o) * torch.tanh(c_new)


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step with a single fused gate convolution over cat(input, h)."""

    def __init__(self, in_channels, hidden_channels, kernel_size=5):
        super().__init__()
        self.in_channels, self.hidden_channels = in_channels, hidden_channels
        # weight (4*hidden, in + hidden, k, k): input channels first, then h; output gates f, i, o, s
        self.gates = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)

    def forward(self, input, state=None, gates_in=None):
        """input (B, in, H, W), or None for an all-zero input (only with state None); state (c, h) or None
        (the zero initial state);
        gates_in: extra gate pre-activations (B, 4*hidden, H, W) of inputs convolved elsewhere. -> (c', h')."""
        w, b = self.gates.weight, self.gates.bias
        if state is None:
            # h = 0: only the input's columns of the weight contribute (conv of a concatenation = sum of convs)
            if input is None:
                # no input and h = 0: the gates are the bias alone. The 0 * w keeps the weight in the graph with
                # its exact (zero) gradient, so DDP and the optimizer see every parameter used
                gates = (b + 0 * w[:, 0, 0, 0]).view(1, -1, 1, 1)
            else:
                gates = F.conv2d(input, w[:, :self.in_channels], b, padding=self.gates.padding)
            c = None
        else:
            c, h = state
            gates = self.gates(torch.cat([input, h], 1))
        if gates_in is not None:
            gates = gates + gates_in
        return lstm_update(gates, c)
