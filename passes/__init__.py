"""fusenode passes: ONNX graph passes (BatchNorm fusion first) and their verification.

passes never imports node or storage and never sees a CID.
"""
