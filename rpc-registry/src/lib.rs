//! Registry backends (local, memory, etcd, ZooKeeper, Consul, Nacos) and the consumer cache
