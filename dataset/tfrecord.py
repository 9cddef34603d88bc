"""TFRecord framing and tf.train.Example parsing without TensorFlow, for DeepMind's gqn-datasets shards.

The data of Eslami et al. 2018 (supplementary "Datasets") ships as TFRecords of tf.train.Example, one scene per
record: `frames` (S JPEG byte strings) and `cameras` (S*5 floats), see gqn-datasets' data_reader.py.

TFRecord framing, per record:
    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)
Every CRC is verified; any damage raises TFRecordError (a cli.UserError) naming the record index and what is
wrong. A length field is checked against the bytes left in the file before anything is read, so a damaged or
hostile one (up to 2^64 - 1, its CRC honest) allocates nothing.
The Example schema is built here from descriptors (tensorflow/core/example/{example,feature}.proto), so neither
protoc nor TensorFlow is needed; parsing runs in protobuf's C (upb) backend.
"""
import os
import struct

import crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cli import UserError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class TFRecordError(UserError, ValueError):
    """A damaged TFRecord file or record; str() is '<file>: record <i>: <what is wrong>'."""


def masked_crc(data):
    """TFRecord's masked CRC32C (rotate right by 15, add a constant), as in tensorflow/core/lib/hash/crc32c.h."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path):
    """Yield the data bytes of each record of a TFRecord file, verifying both CRCs of every record."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        index = 0
        while True:
            header = f.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                raise TFRecordError(f"{path}: record {index}: truncated (file ends inside the record header)")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc(header[:8]) != length_crc:
                raise TFRecordError(f"{path}: record {index}: corrupt length field (CRC32C mismatch)")
            # f.read(n) allocates n bytes before it reads: a length beyond the file's end is refused first.
            fits = length <= size - f.tell() - _FOOTER.size
            data = f.read(length) if fits else b""
            footer = f.read(_FOOTER.size) if fits else b""
            if not fits or len(data) < length or len(footer) < _FOOTER.size:
                raise TFRecordError(f"{path}: record {index}: truncated (file ends inside the record data, "
                                    f"{length} bytes expected)")
            if masked_crc(data) != _FOOTER.unpack(footer)[0]:
                raise TFRecordError(f"{path}: record {index}: corrupt data (CRC32C mismatch)")
            yield data
            index += 1


def write_records(path, records):
    """Write byte strings as a TFRecord file (for tests and benchmarks; conversion never writes TFRecords)."""
    with open(path, "wb") as f:
        for data in records:
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", masked_crc(length)))
            f.write(data)
            f.write(struct.pack("<I", masked_crc(data)))


def _example_classes():
    """tf.train.Example and friends, from descriptors equal to TensorFlow's feature.proto/example.proto."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="gqn_tf_example.proto", package="tensorflow", syntax="proto3")

    def message(name, fields, map_entry=False):
        m = fdp.message_type.add(name=name)
        for number, (fname, ftype, label, type_name, oneof) in enumerate(fields, 1):
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if oneof is not None:
                f.oneof_index = oneof
            if label == F.LABEL_REPEATED and ftype in (F.TYPE_FLOAT, F.TYPE_INT64):
                f.options.packed = True
        if map_entry:
            m.options.map_entry = True
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [("value", F.TYPE_BYTES, rep, None, None)])
    message("FloatList", [("value", F.TYPE_FLOAT, rep, None, None)])
    message("Int64List", [("value", F.TYPE_INT64, rep, None, None)])
    feature = message("Feature", [("bytes_list", F.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
                                  ("float_list", F.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
                                  ("int64_list", F.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0)])
    feature.oneof_decl.add(name="kind")
    features = message("Features", [("feature", F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry", None)])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    entry.options.map_entry = True
    message("Example", [("features", F.TYPE_MESSAGE, opt, ".tensorflow.Features", None)])

    # A private pool: no clash with TensorFlow's or TensorBoard's own copies if they are imported too.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{name}"))
            for name in ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List")}


_CLASSES = _example_classes()
Example = _CLASSES["Example"]


def parse_example(data):
    """Serialized tf.train.Example -> dict name -> list of bytes / floats / ints. Raises ValueError if malformed."""
    example = Example()
    try:
        example.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError; its message is terse, the caller adds file and record
        raise ValueError(f"not a tf.train.Example ({e})") from None
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out


def make_example(features):
    """dict name -> list of bytes / floats / ints -> serialized tf.train.Example (tests and benchmarks)."""
    example = Example()
    for name, values in features.items():
        feature = example.features.feature[name]
        values = list(values)
        if values and isinstance(values[0], (bytes, bytearray)):
            feature.bytes_list.value.extend(values)
        elif values and all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        else:
            feature.float_list.value.extend(float(v) for v in values)
    return example.SerializeToString()
