/* Schemas the Protobuf wire walker is checked against the reflection path with
 * (tests/unit/test_kafka_protobuf_walk.c, tests/fuzz/fuzz_kafka_protobuf_walk.c): every scalar
 * type, packed and unpacked repeated fields, nested and recursive messages, maps of most key and
 * value kinds, oneofs, proto3 optional, open and closed enums, proto2 required fields and
 * defaults, and a type with a well-known type the walker declines. */
#ifndef ESMD_TEST_PB_WALK_SCHEMAS_H
#define ESMD_TEST_PB_WALK_SCHEMAS_H

/* Message types in order: Inner (0), All (1), Wkt (2). */
#define PB_WALK_PROTO3                                                                             \
    "syntax = \"proto3\";\n"                                                                       \
    "package w;\n"                                                                                 \
    "import \"google/protobuf/timestamp.proto\";\n"                                                \
    "enum Color { RED = 0; GREEN = 1; BLUE = 2; NEG = -5; }\n"                                     \
    "message Inner { int32 a = 1; string s = 2; repeated Inner kids = 3; Color c = 4; }\n"         \
    "message All {\n"                                                                              \
    "  int32 i32 = 1; int64 i64 = 2; uint32 u32 = 3; uint64 u64 = 4; sint32 s32 = 5;\n"            \
    "  sint64 s64 = 6; fixed32 f32 = 7; fixed64 f64 = 8; sfixed32 sf32 = 9; sfixed64 sf64 = 10;\n" \
    "  float fl = 11; double db = 12; bool ok = 13; string s = 14; bytes b = 15;\n"                \
    "  Color color = 16; Inner inner = 17;\n"                                                      \
    "  repeated int32 r_i32 = 18; repeated int64 r_i64 = 19; repeated uint32 r_u32 = 20;\n"        \
    "  repeated uint64 r_u64 = 21; repeated sint32 r_s32 = 22; repeated sint64 r_s64 = 23;\n"      \
    "  repeated fixed32 r_f32 = 24; repeated fixed64 r_f64 = 25; repeated sfixed32 r_sf32 = 26;\n" \
    "  repeated sfixed64 r_sf64 = 27; repeated float r_fl = 28; repeated double r_db = 29;\n"      \
    "  repeated bool r_ok = 30; repeated string r_s = 31; repeated bytes r_b = 32;\n"              \
    "  repeated Color r_color = 33; repeated Inner r_inner = 34;\n"                                \
    "  repeated int32 unpacked = 35 [packed = false];\n"                                           \
    "  map<string, int32> m_si = 36; map<int64, string> m_ls = 37; map<bool, Inner> m_bi = 38;\n"  \
    "  map<uint32, Color> m_uc = 39; map<sint64, double> m_sd = 40;\n"                             \
    "  map<fixed32, bytes> m_fb = 41; map<string, Inner> m_sm = 42;\n"                             \
    "  oneof pick { string o_s = 43; Inner o_m = 44; int32 o_i = 45; Color o_c = 46; }\n"          \
    "  optional int32 opt_i = 47; optional string opt_s = 48; optional double opt_d = 49;\n"       \
    "  int32 snake_case_name = 50; sfixed32 big_number = 100000;\n"                                \
    "}\n"                                                                                          \
    "message Wkt { int32 a = 1; google.protobuf.Timestamp at = 2; }\n"

/* Message types in order: Q (0), Opt (1). */
#define PB_WALK_PROTO2                                                                             \
    "syntax = \"proto2\";\n"                                                                       \
    "package v;\n"                                                                                 \
    "enum E { A = 1; B = 2; C = -3; }\n"                                                           \
    "enum F { Z = 0; Y = 1; }\n"                                                                   \
    "message Q {\n"                                                                                \
    "  required int32 id = 1; optional string name = 2; optional E e = 3 [default = B];\n"         \
    "  repeated E es = 4; repeated E pes = 5 [packed = true]; optional Q child = 6;\n"             \
    "  map<string, F> me = 7; optional bytes raw = 8; optional float f = 9 [default = 1.5];\n"     \
    "  repeated int64 ls = 10; optional sint32 z = 11; optional bool flag = 12;\n"                 \
    "  oneof o { int64 oa = 13; Q ob = 14; }\n"                                                    \
    "}\n"                                                                                          \
    "message Opt { optional int32 x = 1; optional Q q = 2; repeated Q qs = 3; }\n"

#endif
