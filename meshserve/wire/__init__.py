"""The wire layer: what the gateway and the model servers both speak, and the only place they meet.

Tensors ↔ numpy (`tensors`), safe image probing and decoding with their limits (`images`), and the
signature types plus one signature per model kind (`signature`, `signatures`).
"""
