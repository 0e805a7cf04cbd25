// Protobuf records of a schema registry (kafka_protobuf.h, docs/kafka.md "Schema registry"): the
// one C++ file of esmd, a thin layer over libprotobuf behind a C API.
//
// A schema is a DescriptorPool fed from a database of the registry's files (a .proto text parsed
// with compiler::Parser, or a serialized FileDescriptorProto) merged with the descriptors compiled
// into libprotobuf, so that imports of google/protobuf's well-known types (timestamp.proto, ...)
// resolve. A record is parsed into a DynamicMessage (the strict check: malformed data, fields
// the type does not have, required fields missing, nesting) and rendered with protobuf's JSON
// printer through a TypeResolver kept with the schema. Every entry point catches everything:
// no exception reaches C.
#include "kafka_protobuf.h"

#include <google/protobuf/compiler/parser.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/descriptor_database.h>
#include <google/protobuf/dynamic_message.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/message.h>
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/type_resolver.h>
#include <google/protobuf/util/type_resolver_util.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pb = google::protobuf;

namespace
{

const char kTypeUrlPrefix[] = "type.googleapis.com";
const char kMainName[] = "esmd-registry-schema.proto";

void set_err(char *err, size_t errlen, const std::string &msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg.c_str());
}

// libprotobuf logs some data errors (a proto3 string that is not UTF-8, ...) to stderr: esmd
// reports them as the record's error instead. FATAL ones still throw (caught below).
void quiet_log(pb::LogLevel, const char *, int, const std::string &) {}

void init_once()
{
    static std::once_flag once;
    std::call_once(once, [] { pb::SetLogHandler(quiet_log); });
}

// The first error of a .proto text, "line L:C: message".
class TextErrors : public pb::io::ErrorCollector
{
  public:
    std::string first;
    void AddError(int line, pb::io::ColumnNumber column, const std::string &message) override
    {
        if (first.empty())
            first = "line " + std::to_string(line + 1) + ":" + std::to_string(column + 1) + ": " +
                    message;
    }
};

// The first error of linking the files (an import missing, a type undefined, ...).
class PoolErrors : public pb::DescriptorPool::ErrorCollector
{
  public:
    std::string first;
    void AddError(const std::string &filename, const std::string &element_name, const pb::Message *,
                  ErrorLocation, const std::string &message) override
    {
        if (first.empty())
            first =
                filename + (element_name.empty() ? "" : " (" + element_name + ")") + ": " + message;
    }
};

bool to_proto(const esmd_pb_file &f, const std::string &name, pb::FileDescriptorProto *out,
              std::string *why)
{
    if (f.len > (size_t)INT_MAX) {
        *why = name + ": too large";
        return false;
    }
    if (f.binary) {
        if (!out->ParseFromArray(f.data, (int)f.len)) {
            *why = name + ": not a serialized FileDescriptorProto";
            return false;
        }
    } else {
        pb::io::ArrayInputStream in(f.data, (int)f.len);
        TextErrors errors;
        pb::io::Tokenizer tokens(&in, &errors);
        pb::compiler::Parser parser;
        parser.RecordErrorsTo(&errors);
        if (!parser.Parse(&tokens, out) || !errors.first.empty()) {
            *why = name + ": " + (errors.first.empty() ? "not a .proto file" : errors.first);
            return false;
        }
    }
    out->set_name(name);
    return true;
}

} // namespace

struct esmd_pb_schema {
    // Declared in the order they depend on each other (destroyed in reverse).
    pb::SimpleDescriptorDatabase own;
    pb::DescriptorPoolDatabase builtin{*pb::DescriptorPool::generated_pool()};
    pb::MergedDescriptorDatabase merged{&own, &builtin};
    PoolErrors errors;
    pb::DescriptorPool pool{&merged, &errors};
    pb::DynamicMessageFactory factory{&pool};
    std::unique_ptr<pb::util::TypeResolver> resolver;
    const pb::FileDescriptor *file = nullptr;
};

extern "C" struct esmd_pb_schema *esmd_pb_schema_new(const struct esmd_pb_file *files, size_t n,
                                                     char *err, size_t errlen)
{
    try {
        init_once();
        if (n == 0) {
            set_err(err, errlen, "no .proto file");
            return nullptr;
        }
        std::unique_ptr<esmd_pb_schema> s(new esmd_pb_schema());
        std::string why, main_name;
        for (size_t i = 0; i < n; i++) {
            std::string name = files[i].name ? files[i].name : "";
            if (i == 0 && name.empty())
                name = kMainName;
            if (name.empty()) {
                set_err(err, errlen, "an imported file has no name");
                return nullptr;
            }
            if (i == 0)
                main_name = name;
            pb::FileDescriptorProto fdp;
            if (!to_proto(files[i], name, &fdp, &why)) {
                set_err(err, errlen, why);
                return nullptr;
            }
            if (!s->own.AddAndOwn(new pb::FileDescriptorProto(std::move(fdp)))) {
                set_err(err, errlen, name + ": given twice");
                return nullptr;
            }
        }
        s->file = s->pool.FindFileByName(main_name);
        if (!s->file) {
            set_err(err, errlen,
                    s->errors.first.empty() ? main_name + ": does not link" : s->errors.first);
            return nullptr;
        }
        if (s->file->message_type_count() == 0) {
            set_err(err, errlen, "the schema defines no message type");
            return nullptr;
        }
        s->resolver.reset(pb::util::NewTypeResolverForDescriptorPool(kTypeUrlPrefix, &s->pool));
        return s.release();
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("libprotobuf: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "libprotobuf failed");
    }
    return nullptr;
}

extern "C" void esmd_pb_schema_free(struct esmd_pb_schema *s)
{
    try {
        delete s;
    } catch (...) {
    }
}

namespace
{

// The first field the message (or one it holds) has that its type does not declare: data not
// written with this schema. Nesting is bounded by the parse's recursion limit.
bool find_unknown(const pb::Message &m, std::string *where)
{
    const pb::Reflection *r = m.GetReflection();
    const pb::UnknownFieldSet &u = r->GetUnknownFields(m);
    if (!u.empty()) {
        *where = "field " + std::to_string(u.field(0).number()) + " of " +
                 m.GetDescriptor()->full_name() + " is not in the schema";
        return true;
    }
    std::vector<const pb::FieldDescriptor *> fields;
    r->ListFields(m, &fields);
    for (const pb::FieldDescriptor *f : fields) {
        if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE)
            continue;
        if (f->is_repeated()) {
            int k = r->FieldSize(m, f);
            for (int i = 0; i < k; i++)
                if (find_unknown(r->GetRepeatedMessage(m, f, i), where))
                    return true;
        } else if (find_unknown(r->GetMessage(m, f), where)) {
            return true;
        }
    }
    return false;
}

} // namespace

extern "C" char *esmd_pb_decode(const struct esmd_pb_schema *s, const int64_t *idx, size_t n,
                                const unsigned char *msg, size_t len, size_t max_json,
                                size_t *json_len, char *err, size_t errlen)
{
    try {
        init_once();
        if (n > ESMD_PB_MAX_DEPTH) {
            set_err(err, errlen, "the message indexes nest deeper than the limit");
            return nullptr;
        }
        const pb::Descriptor *d = nullptr;
        int64_t first = n ? idx[0] : 0;
        if (first < 0 || first >= s->file->message_type_count()) {
            set_err(err, errlen,
                    "message index " + std::to_string(first) + " is not in the schema (it has " +
                        std::to_string(s->file->message_type_count()) + " message types)");
            return nullptr;
        }
        d = s->file->message_type((int)first);
        for (size_t i = 1; i < n; i++) {
            if (idx[i] < 0 || idx[i] >= d->nested_type_count()) {
                set_err(err, errlen,
                        "message index " + std::to_string(idx[i]) + " is not a nested type of " +
                            d->full_name());
                return nullptr;
            }
            d = d->nested_type((int)idx[i]);
        }
        if (len > (size_t)INT_MAX) {
            set_err(err, errlen, "the Protobuf data is too large");
            return nullptr;
        }
        // const_cast: the factory is thread-safe and only caches prototypes.
        const pb::Message *proto =
            const_cast<pb::DynamicMessageFactory &>(s->factory).GetPrototype(d);
        if (!proto) {
            set_err(err, errlen, "no message type " + d->full_name());
            return nullptr;
        }
        std::unique_ptr<pb::Message> m(proto->New());
        pb::io::CodedInputStream in(msg, (int)len);
        in.SetRecursionLimit(ESMD_PB_MAX_DEPTH);
        if (!m->MergePartialFromCodedStream(&in) || !in.ConsumedEntireMessage()) {
            set_err(err, errlen,
                    "the data is not a Protobuf " + d->full_name() +
                        " (malformed, or nesting deeper than " + std::to_string(ESMD_PB_MAX_DEPTH) +
                        " levels)");
            return nullptr;
        }
        if (!m->IsInitialized()) {
            set_err(err, errlen,
                    d->full_name() + " misses required fields: " + m->InitializationErrorString());
            return nullptr;
        }
        std::string where;
        if (find_unknown(*m, &where)) {
            set_err(err, errlen, where + " (not written with this schema)");
            return nullptr;
        }
        std::string out;
        pb::util::JsonPrintOptions opts;
        pb::util::Status st = pb::util::BinaryToJsonString(
            s->resolver.get(), std::string(kTypeUrlPrefix) + "/" + d->full_name(),
            std::string(reinterpret_cast<const char *>(msg), len), &out, opts);
        if (!st.ok()) {
            set_err(err, errlen, "Protobuf to JSON: " + st.ToString());
            return nullptr;
        }
        if (out.size() > max_json) {
            set_err(err, errlen, "decoded record is larger than the event can carry");
            return nullptr;
        }
        char *r = static_cast<char *>(malloc(out.size() + 1));
        if (!r) {
            set_err(err, errlen, "out of memory");
            return nullptr;
        }
        memcpy(r, out.data(), out.size());
        r[out.size()] = '\0';
        *json_len = out.size();
        return r;
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("libprotobuf: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "libprotobuf failed");
    }
    return nullptr;
}
