"""fusenode storage: encryption, segmenting + erasure coding, manifests, IPFS backends.

storage never imports node or passes and never looks inside a model: it stores opaque bytes.
"""
