package relay

//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -nostdinc" -target bpfel -type relay_config -type flow_key -type rewrite -type flow_stats relay bpf/relay.c -- -I./bpf
