"""Helpers for driving etcd from the benchmarks without an etcd client library.

`stubs.compile_stubs(dir)` compiles `rpc.proto` (a subset of etcd's v3 API with the real field
numbers) with `grpc_tools.protoc` at run time and returns the generated modules; `launch.Etcd`
starts one or three etcd members on loopback, each with its own data folder, and kills them.
Nothing here installs anything: `launch.etcd_binary()` is None when etcd is missing.
"""
