package testenv

import "github.com/btmm/btmm/controlplane/kernelprobe"

// probeTCX attaches a trivial SCHED_CLS program with TCX to a veth in the
// throwaway namespace: the only honest test of TCX support.
var probeTCX = kernelprobe.ProbeTCX
