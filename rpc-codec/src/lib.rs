//! Wire format of the RPC framework: frame header, envelopes, serializers
