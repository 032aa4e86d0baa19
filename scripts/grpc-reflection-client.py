#!/usr/bin/env python3
"""List ferryd's gRPC services and methods through the standard reflection service,
with a stock gRPC client (grpcio + grpcio-reflection from PyPI), then call ListVms
without any ferry-specific generated code.

    pip install grpcio grpcio-reflection protobuf
    scripts/grpc-reflection-client.py --agent 127.0.0.1:7701 --pki-dir build/demo/pki --identity operator
"""
import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", default="127.0.0.1:7701")
    ap.add_argument("--pki-dir", required=True)
    ap.add_argument("--identity", default="operator")
    a = ap.parse_args()
    read = lambda p: open(p, "rb").read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(f"{a.pki_dir}/ca.pem"),
        private_key=read(f"{a.pki_dir}/{a.identity}.key"),
        certificate_chain=read(f"{a.pki_dir}/{a.identity}.pem"),
    )
    host = a.agent.rsplit(":", 1)[0]
    channel = grpc.secure_channel(a.agent, creds, options=[("grpc.ssl_target_name_override", host)])
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    for name in db.get_services():
        print(name)
        if name.startswith("grpc."):
            continue
        svc = pool.FindServiceByName(name)
        for m in svc.methods:
            print(f"  {m.name}({m.input_type.full_name}) -> {m.output_type.full_name}")
    # A call built only from the reflected descriptors.
    req_t = message_factory.GetMessageClass(pool.FindMessageTypeByName("ferry.v1.ListVmsRequest"))
    resp_t = message_factory.GetMessageClass(pool.FindMessageTypeByName("ferry.v1.ListVmsResponse"))
    call = channel.unary_unary("/ferry.v1.FerryControl/ListVms", request_serializer=req_t.SerializeToString, response_deserializer=resp_t.FromString)
    resp = call(req_t())
    print(f"ListVms: {len(resp.vms)} VM(s): {', '.join(v.spec.name for v in resp.vms) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
