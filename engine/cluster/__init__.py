"""Multi-process clusters: the manifest, the launcher and its process control (on loopback, or
with `c.up(netns=True)` each process in a network namespace of its own), deployment specs for
processes on hosts of their own (`engine.cluster.spec`) and what orchestrators read
(`engine.cluster.deploy`).

    from engine.cluster import Cluster
    c = Cluster("./c1")
    c.up()                      # six node processes + the writer endpoint, all SERVING
    db = c.connect()            # an engine.Database over gRPC
    c.kill("n3"); c.start("n3") # SIGKILL / start again; also stop (SIGSTOP), cont (SIGCONT)
    c.down()
"""

from engine.cluster.launcher import Cluster, port_free
from engine.cluster.manifest import BASE_PORT_DEFAULT, WRITER, ClusterError, load_manifest

__all__ = ["BASE_PORT_DEFAULT", "WRITER", "Cluster", "ClusterError", "load_manifest", "port_free"]
