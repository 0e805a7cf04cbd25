"""A FileDescriptorProto written back as .proto text, for the stand-in schema registry
(schema_registry.py): Confluent's registry stores a Protobuf schema registered as the base64 of a
serialized FileDescriptorProto (what confluent-kafka's ProtobufSerializer sends) as .proto text
and answers that text by default, so the stand-in does the same.

Covers what the tests' schemas use: proto2 and proto3, packages, imports, messages nested to any
depth, enums, oneofs, map fields, proto3 `optional`, repeated fields with their `packed` option,
proto2 defaults and explicit json names. File and message options other than these, services,
extensions and groups raise NotImplementedError (the registry then keeps the base64 form).

Nested types are written before the fields of their message, so that the map entry types the
parser makes for map fields come after them, as protoc orders them when maps follow the nested
types in the source (message indexes count nested types in this order)."""

from google.protobuf import descriptor_pb2

F = descriptor_pb2.FieldDescriptorProto
_SCALAR = {F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64",
           F.TYPE_UINT64: "uint64", F.TYPE_INT32: "int32", F.TYPE_FIXED64: "fixed64",
           F.TYPE_FIXED32: "fixed32", F.TYPE_BOOL: "bool", F.TYPE_STRING: "string",
           F.TYPE_BYTES: "bytes", F.TYPE_UINT32: "uint32", F.TYPE_SFIXED32: "sfixed32",
           F.TYPE_SFIXED64: "sfixed64", F.TYPE_SINT32: "sint32", F.TYPE_SINT64: "sint64"}


def _camel(name):
    out, up = [], False
    for c in name:
        if c == "_":
            up = True
        else:
            out.append(c.upper() if up else c)
            up = False
    return "".join(out)


def _type(f):
    if f.type in (F.TYPE_MESSAGE, F.TYPE_ENUM):
        return f.type_name  # fully qualified, with its leading dot
    if f.type == F.TYPE_GROUP:
        raise NotImplementedError("groups")
    return _SCALAR[f.type]


def _quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _field(f, syntax, maps, ind, in_oneof=False):
    opts = []
    if f.HasField("default_value"):
        v = f.default_value
        opts.append("default = " + (_quote(v) if f.type in (F.TYPE_STRING, F.TYPE_BYTES) else v))
    if f.HasField("json_name") and f.json_name != _camel(f.name):
        opts.append("json_name = " + _quote(f.json_name))
    if f.options.HasField("packed"):
        opts.append("packed = " + ("true" if f.options.packed else "false"))
    if f.options.ListFields() and not f.options.HasField("packed"):
        raise NotImplementedError("field options")
    tail = " [%s]" % ", ".join(opts) if opts else ""
    if f.label == F.LABEL_REPEATED and f.type_name in maps:
        k, v = maps[f.type_name]
        return "%smap<%s, %s> %s = %d%s;" % (ind, _type(k), _type(v), f.name, f.number, tail)
    label = ""
    if f.label == F.LABEL_REPEATED:
        label = "repeated "
    elif f.label == F.LABEL_REQUIRED:
        label = "required "
    elif not in_oneof and (syntax == "proto2" or f.proto3_optional):
        label = "optional "
    return "%s%s%s %s = %d%s;" % (ind, label, _type(f), f.name, f.number, tail)


def _enum(e, ind):
    if e.options.ListFields():
        raise NotImplementedError("enum options")
    lines = ["%senum %s {" % (ind, e.name)]
    lines += ["%s  %s = %d;" % (ind, v.name, v.number) for v in e.value]
    return lines + [ind + "}"]


def _message(m, scope, syntax, ind):
    if m.extension or m.extension_range or m.options.ListFields():
        raise NotImplementedError("extensions or message options")
    full = scope + "." + m.name
    maps = {}
    for n in m.nested_type:
        if n.options.map_entry:
            maps[full + "." + n.name] = (n.field[0], n.field[1])
    lines = ["%smessage %s {" % (ind, m.name)]
    for n in m.nested_type:
        if not n.options.map_entry:
            lines += _message(n, full, syntax, ind + "  ")
    for e in m.enum_type:
        lines += _enum(e, ind + "  ")
    done = set()
    for f in m.field:
        real_oneof = f.HasField("oneof_index") and not f.proto3_optional
        if not real_oneof:
            lines.append(_field(f, syntax, maps, ind + "  "))
        elif f.oneof_index not in done:
            done.add(f.oneof_index)
            lines.append("%s  oneof %s {" % (ind, m.oneof_decl[f.oneof_index].name))
            lines += [_field(g, syntax, maps, ind + "    ", True) for g in m.field
                      if g.HasField("oneof_index") and g.oneof_index == f.oneof_index]
            lines.append(ind + "  }")
    return lines + [ind + "}"]


def to_text(fdp):
    """-> the .proto text of fdp (a descriptor_pb2.FileDescriptorProto)."""
    if fdp.service or fdp.extension or fdp.options.ListFields():
        raise NotImplementedError("services, extensions or file options")
    syntax = fdp.syntax or "proto2"
    lines = ['syntax = "%s";' % syntax]
    if fdp.package:
        lines.append("package %s;" % fdp.package)
    public = set(fdp.public_dependency)
    for i, dep in enumerate(fdp.dependency):
        lines.append("import %s%s;" % ("public " if i in public else "", _quote(dep)))
    scope = "." + fdp.package if fdp.package else ""
    for m in fdp.message_type:
        lines += _message(m, scope, syntax, "")
    for e in fdp.enum_type:
        lines += _enum(e, "")
    return "\n".join(lines) + "\n"
