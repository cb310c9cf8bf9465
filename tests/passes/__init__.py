"""Tests of fusenode.passes: the BatchNorm-fusion rules, their numerics, realistic models."""
