package ebpf

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -nostdinc" -target bpfel -type btmm_config -type peer -type outer -type counters -type ula btmm bpf/btmm.c -- -I./bpf
