// Protobuf records of a schema registry (kafka_protobuf.h, docs/kafka.md "Schema registry"): a
// thin layer over libprotobuf behind a C API (as kafka_jsonschema.cc is over valijson).
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
#include <google/protobuf/type.pb.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/type_resolver.h>
#include <google/protobuf/util/type_resolver_util.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
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

// libprotobuf's resolver over a DescriptorPool converts a descriptor to a google.protobuf.Type
// each time the JSON printer asks, once per message type per record: most of the cost of a
// record. The types of a schema never change, so each is converted once and kept.
class CachingResolver : public pb::util::TypeResolver
{
  public:
    explicit CachingResolver(pb::util::TypeResolver *inner) : inner_(inner) {}

    pb::util::Status ResolveMessageType(const std::string &url, pb::Type *type) override
    {
        return resolve(url, type, types_, [this](const std::string &u, pb::Type *t) {
            return inner_->ResolveMessageType(u, t);
        });
    }

    pb::util::Status ResolveEnumType(const std::string &url, pb::Enum *type) override
    {
        return resolve(url, type, enums_, [this](const std::string &u, pb::Enum *t) {
            return inner_->ResolveEnumType(u, t);
        });
    }

  private:
    template <typename T, typename F>
    pb::util::Status resolve(const std::string &url, T *out, std::unordered_map<std::string, T> &m,
                             F fetch)
    {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = m.find(url);
        if (it == m.end()) {
            T t;
            pb::util::Status st = fetch(url, &t);
            if (!st.ok())
                return st;
            it = m.emplace(url, std::move(t)).first;
        }
        *out = it->second;
        return pb::util::Status();
    }

    std::unique_ptr<pb::util::TypeResolver> inner_;
    std::mutex mu_;
    std::unordered_map<std::string, pb::Type> types_;
    std::unordered_map<std::string, pb::Enum> enums_;
};

// Protobuf's canonical JSON mapping of scalar values, shared by the two ways a record is written
// (JsonWriter by reflection, WireWalker from the wire data): one spelling of numbers, strings,
// bytes, enums and map keys.
class JsonOut
{
  public:
    std::string out;
    bool bad_utf8 = false;

    // An integer in decimal; quoted (64-bit ones, as the JSON mapping writes them).
    void integer(int64_t v, bool quoted)
    {
        digits(v < 0 ? 0ULL - (uint64_t)v : (uint64_t)v, v < 0, quoted);
    }

    void digits(uint64_t u, bool negative, bool quoted)
    {
        char d[24], *e = d + sizeof(d), *q = e;
        if (quoted)
            *--q = '"';
        do {
            *--q = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        if (negative)
            *--q = '-';
        if (quoted)
            *--q = '"';
        out.append(q, (size_t)(e - q));
    }

    void number(double v, bool single)
    {
        if (std::isnan(v)) {
            out += "\"NaN\"";
            return;
        }
        if (std::isinf(v)) {
            out += v > 0 ? "\"Infinity\"" : "\"-Infinity\"";
            return;
        }
        // Most values in records (prices, rates) have few decimals: n / 10^k for the smallest k
        // up to 8 that reads back as v is written with integer arithmetic, without printf.
        static const double p10[] = {1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8};
        for (int k = 0; k <= 8 && std::fabs(v) < 1e15; k++) {
            double scaled = v * p10[k];
            if (std::fabs(scaled) >= 9007199254740992.0) // 2^53: no longer exact
                break;
            long long n = std::llround(scaled);
            double back = (double)n / p10[k];
            if (single ? (float)back != (float)v : back != v)
                continue;
            if (n == 0 && std::signbit(v)) {
                out += "-0";
                return;
            }
            // the digits of |n|, at least k + 1 of them, the point before the last k
            char d[24], *e = d + sizeof(d), *q = e;
            unsigned long long u = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
            do {
                *--q = (char)('0' + u % 10);
                u /= 10;
            } while (u);
            while (e - q <= k)
                *--q = '0';
            if (n < 0)
                out += '-';
            out.append(q, (size_t)(e - q - k));
            if (k) {
                out += '.';
                out.append(e - k, (size_t)k);
            }
            return;
        }
        char b[40];
        for (int prec = single ? 6 : 15; prec <= (single ? 9 : 17); prec++) {
            snprintf(b, sizeof(b), "%.*g", prec, v);
            double back = strtod(b, nullptr);
            if (single ? (float)back == (float)v : back == v)
                break;
        }
        out += b;
    }

    // Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), as JSON text
    // must be: proto2 strings are not checked when parsed, names from a binary descriptor never.
    static bool utf8(const char *s, size_t len)
    {
        const unsigned char *p = (const unsigned char *)s, *e = p + len;
        while (p < e) {
            unsigned c = *p++;
            if (c < 0x80)
                continue;
            int n = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : c >= 0xc2 ? 1 : -1;
            if (n < 0 || c > 0xf4 || e - p < n)
                return false;
            unsigned cp = c & (0x3f >> n);
            for (int i = 0; i < n; i++, p++) {
                if ((*p & 0xc0) != 0x80)
                    return false;
                cp = (cp << 6) | (*p & 0x3f);
            }
            if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
                (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
                return false;
        }
        return true;
    }

    void string(const std::string &v)
    {
        string(v.data(), v.size());
    }

    void string(const char *v, size_t n)
    {
        // Most strings are ASCII with nothing to escape: one scan, one append.
        const unsigned char *p = (const unsigned char *)v;
        size_t i = 0;
        while (i < n && p[i] >= 0x20 && p[i] < 0x80 && p[i] != '"' && p[i] != '\\')
            i++;
        if (i == n) {
            out += '"';
            out.append(v, n);
            out += '"';
            return;
        }
        if (!utf8(v, n))
            bad_utf8 = true;
        out += '"';
        size_t from = 0;
        for (i = 0; i < n; i++) {
            unsigned char c = p[i];
            if (c >= 0x20 && c != '"' && c != '\\')
                continue;
            out.append(v + from, i - from);
            from = i + 1;
            if (c == '"' || c == '\\') {
                out += '\\';
                out += (char)c;
            } else {
                char b[8];
                snprintf(b, sizeof(b), "\\u%04x", c);
                out += b;
            }
        }
        out.append(v + from, n - from);
        out += '"';
    }

    void base64(const std::string &v)
    {
        base64(v.data(), v.size());
    }

    void base64(const char *v, size_t n)
    {
        static const char tab[] =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        out += '"';
        size_t i = 0;
        for (; i + 2 < n; i += 3) {
            unsigned x = ((unsigned char)v[i] << 16) | ((unsigned char)v[i + 1] << 8) |
                         (unsigned char)v[i + 2];
            out += tab[x >> 18];
            out += tab[(x >> 12) & 63];
            out += tab[(x >> 6) & 63];
            out += tab[x & 63];
        }
        if (i < n) {
            unsigned x = (unsigned char)v[i] << 16;
            if (i + 1 < n)
                x |= (unsigned char)v[i + 1] << 8;
            out += tab[x >> 18];
            out += tab[(x >> 12) & 63];
            out += i + 1 < n ? tab[(x >> 6) & 63] : '=';
            out += '=';
        }
        out += '"';
    }

    // An enum value by its name; a number the enum does not declare (proto3) as that number.
    void enumerated(const pb::EnumDescriptor *e, int v)
    {
        const pb::EnumValueDescriptor *ev = e->FindValueByNumber(v);
        if (e->full_name() == "google.protobuf.NullValue")
            out += "null";
        else if (ev)
            string(ev->name());
        else
            out += std::to_string(v);
    }

    // A map key: always a JSON string (64-bit integers and strings already are).
    template <typename F> bool map_key(const pb::FieldDescriptor *kf, F write)
    {
        pb::FieldDescriptor::CppType t = kf->cpp_type();
        bool quote = t != pb::FieldDescriptor::CPPTYPE_STRING &&
                     t != pb::FieldDescriptor::CPPTYPE_INT64 &&
                     t != pb::FieldDescriptor::CPPTYPE_UINT64;
        if (quote)
            out += '"';
        bool ok = write();
        if (quote)
            out += '"';
        return ok;
    }
};

// What the wire walker (WireWalker below) knows of a message type, worked out once per schema:
// its fields by number, each with its wire type and how it is written. ok is false when the walker
// declines the type (see plan_local) or a type it reaches: libprotobuf's parse then decodes it.
struct WalkPlan;

struct WalkField {
    const pb::FieldDescriptor *f;
    std::string name; // "jsonName": as JSON, with the colon
    pb::FieldDescriptor::Type type;
    unsigned wire;    // the wire type of one value
    bool repeated;    // a repeated field, not a map
    bool packable;    // repeated scalar numbers: packed data is taken too
    bool presence;    // written when present; otherwise when not the default value
    bool required;    // proto2 required
    bool closed_enum; // a proto2 enum: a number it does not declare is an unknown field
    bool utf8;        // a string (checked in every occurrence, as libprotobuf's parse does)
    int oneof;        // index of its real oneof, or -1
    const WalkPlan *sub = nullptr; // message type, or the map's entry type
    bool map = false;
};

struct WalkPlan {
    const pb::Descriptor *d;
    bool ok = true;
    std::vector<WalkField> fields; // in field number order
    std::vector<int16_t> small;    // slot + 1 by number, numbers below 256
    std::unordered_map<int, int> big;
    int nrequired = 0;

    int slot(uint64_t number) const
    {
        if (number < small.size())
            return small[number] - 1;
        auto it = big.find((int)number);
        return it == big.end() ? -1 : it->second;
    }
};

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
    // Whether a message type of the file, or one its fields reach, has a required field (proto2):
    // when none does, a record cannot miss one and the check (a reflection walk) is skipped.
    bool has_required = false;
    // The wire walker's view of each message type the file's types reach.
    std::unordered_map<const pb::Descriptor *, std::unique_ptr<WalkPlan>> plans;
};

namespace
{

// A worklist, not recursion: a schema may chain thousands of message types (M0 has an M1, which
// has an M2, ...), which would overflow the stack.
bool reaches_required(const pb::Descriptor *root, std::unordered_set<const pb::Descriptor *> *seen)
{
    std::vector<const pb::Descriptor *> todo{root};
    while (!todo.empty()) {
        const pb::Descriptor *d = todo.back();
        todo.pop_back();
        if (!seen->insert(d).second)
            continue;
        for (int i = 0; i < d->field_count(); i++) {
            const pb::FieldDescriptor *f = d->field(i);
            if (f->is_required())
                return true;
            if (f->message_type())
                todo.push_back(f->message_type());
        }
        for (int i = 0; i < d->nested_type_count(); i++)
            todo.push_back(d->nested_type(i));
    }
    return false;
}

bool in_google(const pb::FileDescriptor *f)
{
    return f->name().compare(0, 16, "google/protobuf/") == 0;
}

// Real oneofs a type may have for the walker (it keeps their state in an array on the stack).
const int kWalkOneofs = 32;

// The wire type of one value of a field of type t.
unsigned wire_type(pb::FieldDescriptor::Type t)
{
    switch (t) {
    case pb::FieldDescriptor::TYPE_DOUBLE:
    case pb::FieldDescriptor::TYPE_FIXED64:
    case pb::FieldDescriptor::TYPE_SFIXED64:
        return 1;
    case pb::FieldDescriptor::TYPE_FLOAT:
    case pb::FieldDescriptor::TYPE_FIXED32:
    case pb::FieldDescriptor::TYPE_SFIXED32:
        return 5;
    case pb::FieldDescriptor::TYPE_STRING:
    case pb::FieldDescriptor::TYPE_BYTES:
    case pb::FieldDescriptor::TYPE_MESSAGE:
        return 2;
    case pb::FieldDescriptor::TYPE_GROUP:
        return 3;
    default:
        return 0;
    }
}

// A new plan of d, its fields' plans not yet linked (plan_of). The walker declines, here, what it
// does not write exactly as the reflection path: the well-known types (JSON mappings of their own),
// types with extension ranges, groups, enums of google/protobuf (NullValue is written as null) or
// of a file of the other syntax than the field's (whether libprotobuf keeps an undeclared number is
// then a question of its version), names that are not UTF-8.
WalkPlan *new_plan(esmd_pb_schema *s, const pb::Descriptor *d)
{
    WalkPlan *p = new WalkPlan;
    s->plans.emplace(d, std::unique_ptr<WalkPlan>(p));
    p->d = d;
    if (in_google(d->file()) || d->extension_range_count() > 0 ||
        d->oneof_decl_count() > kWalkOneofs || d->field_count() > 30000)
        p->ok = false;
    std::vector<const pb::FieldDescriptor *> fs;
    for (int i = 0; i < d->field_count(); i++)
        fs.push_back(d->field(i));
    std::sort(fs.begin(), fs.end(), [](const pb::FieldDescriptor *a, const pb::FieldDescriptor *b) {
        return a->number() < b->number();
    });
    for (const pb::FieldDescriptor *f : fs) {
        WalkField w;
        w.f = f;
        w.type = f->type();
        JsonOut name;
        name.string(f->json_name());
        w.name = name.out + ":";
        w.wire = wire_type(w.type);
        w.map = f->is_map();
        w.repeated = f->is_repeated() && !w.map;
        w.packable = f->is_packable();
        w.presence = f->has_presence();
        w.required = f->is_required();
        w.utf8 = w.type == pb::FieldDescriptor::TYPE_STRING;
        w.closed_enum = false;
        w.oneof = f->real_containing_oneof() ? f->real_containing_oneof()->index() : -1;
        if (name.bad_utf8 || w.type == pb::FieldDescriptor::TYPE_GROUP)
            p->ok = false;
        if (const pb::EnumDescriptor *e = f->enum_type()) {
            if (in_google(e->file()) || e->file()->syntax() != f->file()->syntax())
                p->ok = false;
            w.closed_enum = e->file()->syntax() == pb::FileDescriptor::SYNTAX_PROTO2;
        }
        p->nrequired += w.required;
        p->fields.push_back(std::move(w));
    }
    for (size_t i = 0; i < p->fields.size(); i++) {
        int number = p->fields[i].f->number();
        if (number < 256) {
            if (p->small.size() <= (size_t)number)
                p->small.resize((size_t)number + 1, 0);
            p->small[(size_t)number] = (int16_t)(i + 1);
        } else {
            p->big[number] = (int)i;
        }
    }
    return p;
}

// The plan of d and of every type its fields reach, each made once (a recursive type's fields
// point back to its plan). A worklist, not recursion: a schema may chain thousands of message
// types.
WalkPlan *plan_of(esmd_pb_schema *s, const pb::Descriptor *d)
{
    std::vector<WalkPlan *> todo;
    auto get = [s, &todo](const pb::Descriptor *m) {
        auto it = s->plans.find(m);
        if (it != s->plans.end())
            return it->second.get();
        WalkPlan *p = new_plan(s, m);
        todo.push_back(p);
        return p;
    };
    WalkPlan *root = get(d);
    while (!todo.empty()) {
        WalkPlan *p = todo.back();
        todo.pop_back();
        for (WalkField &w : p->fields)
            if (const pb::Descriptor *m = w.f->message_type())
                w.sub = get(m);
    }
    return root;
}

// Plans for every type of the file (nested declarations too); a type that reaches a declined one
// is declined too: the declines go back along the fields, each plan's users once (linear in the
// schema's size, however long its chains).
void make_plans(esmd_pb_schema *s)
{
    std::vector<const pb::Descriptor *> types;
    for (int i = 0; i < s->file->message_type_count(); i++)
        types.push_back(s->file->message_type(i));
    while (!types.empty()) {
        const pb::Descriptor *d = types.back();
        types.pop_back();
        plan_of(s, d);
        for (int i = 0; i < d->nested_type_count(); i++)
            types.push_back(d->nested_type(i));
    }
    std::unordered_map<const WalkPlan *, std::vector<WalkPlan *>> users;
    std::vector<WalkPlan *> declined;
    for (auto &kv : s->plans) {
        WalkPlan *p = kv.second.get();
        if (!p->ok)
            declined.push_back(p);
        for (const WalkField &w : p->fields)
            if (w.sub)
                users[w.sub].push_back(p);
    }
    while (!declined.empty()) {
        const WalkPlan *p = declined.back();
        declined.pop_back();
        auto it = users.find(p);
        if (it == users.end())
            continue;
        for (WalkPlan *u : it->second)
            if (u->ok) {
                u->ok = false;
                declined.push_back(u);
            }
    }
}

// libprotobuf makes a type's prototype (the reflection path's starting point), then those of its
// fields' types, by recursion (DynamicMessage::CrossLinkPrototypes): a chain of thousands of
// message types (M0 has an M1, which has an M2, ...) overflowed the stack at the first record.
// Made here once, the types its fields reach first (an iterative depth-first walk), each finds
// its fields' prototypes made.
void make_prototypes(esmd_pb_schema *s)
{
    std::unordered_set<const pb::Descriptor *> seen;
    std::vector<std::pair<const pb::Descriptor *, int>> stack; // a type, its next field
    for (auto &kv : s->plans) {
        if (!seen.insert(kv.first).second)
            continue;
        stack.emplace_back(kv.first, 0);
        while (!stack.empty()) {
            const pb::Descriptor *d = stack.back().first;
            int i = stack.back().second++;
            if (i < d->field_count()) {
                const pb::Descriptor *m = d->field(i)->message_type();
                if (m && seen.insert(m).second)
                    stack.emplace_back(m, 0);
                continue;
            }
            stack.pop_back();
            s->factory.GetPrototype(d);
        }
    }
}

} // namespace

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
        std::unordered_set<const pb::Descriptor *> seen;
        for (int i = 0; i < s->file->message_type_count() && !s->has_required; i++)
            s->has_required = reaches_required(s->file->message_type(i), &seen);
        make_plans(s.get());
        make_prototypes(s.get());
        s->resolver.reset(new CachingResolver(
            pb::util::NewTypeResolverForDescriptorPool(kTypeUrlPrefix, &s->pool)));
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

// Protobuf's canonical JSON mapping, written from the parsed message by reflection: the same
// output as util::BinaryToJsonString with default options (fields by their json_name, in field
// number order, fields without presence at their default left out, 64-bit integers as strings,
// enums by name, bytes as base64, NaN and infinities as strings, map keys as strings), which
// costs about ten times more a record (it goes through google.protobuf.Type and a stream of
// parse events). The well-known types (google/protobuf/*.proto: Timestamp, Duration, Struct,
// wrappers, Any, ...) have mappings of their own: they are written by that library function.
class JsonWriter : public JsonOut
{
  public:
    JsonWriter(pb::util::TypeResolver *resolver, size_t max) : resolver_(resolver), max_(max)
    {
        out.reserve(512);
    }
    std::string err;

    bool message(const pb::Message &m)
    {
        const pb::Descriptor *d = m.GetDescriptor();
        if (d->file()->name().compare(0, 16, "google/protobuf/") == 0) {
            std::string where;
            if (find_unknown(m, &where))
                return unknown();
            return well_known(m);
        }
        if (out.size() > max_) {
            err = "decoded record is larger than the event can carry";
            return false;
        }
        const pb::Reflection *r = m.GetReflection();
        if (!r->GetUnknownFields(m).empty())
            return unknown();
        // one list of fields a nesting level, kept from record to record
        if (depth_ == lists_.size())
            lists_.emplace_back();
        std::vector<const pb::FieldDescriptor *> &fields = lists_[depth_];
        r->ListFields(m, &fields);
        depth_++;
        bool ok = fields_of(m, r, fields);
        depth_--;
        return ok;
    }

  private:
    pb::util::TypeResolver *resolver_;
    size_t max_;
    std::deque<std::vector<const pb::FieldDescriptor *>> lists_; // stays in place as it grows
    size_t depth_ = 0;

    bool fields_of(const pb::Message &m, const pb::Reflection *r,
                   const std::vector<const pb::FieldDescriptor *> &fields)
    {
        out += '{';
        for (size_t k = 0; k < fields.size(); k++) {
            const pb::FieldDescriptor *f = fields[k];
            if (k)
                out += ',';
            string(f->json_name());
            out += ':';
            if (f->is_map()) {
                const pb::FieldDescriptor *kf = f->message_type()->FindFieldByNumber(1);
                const pb::FieldDescriptor *vf = f->message_type()->FindFieldByNumber(2);
                out += '{';
                for (int i = 0, n = r->FieldSize(m, f); i < n; i++) {
                    const pb::Message &e = r->GetRepeatedMessage(m, f, i);
                    if (!e.GetReflection()->GetUnknownFields(e).empty())
                        return unknown();
                    if (i)
                        out += ',';
                    if (!map_key(kf, [&] { return value(e, kf, -1); }))
                        return false;
                    out += ':';
                    if (!value(e, vf, -1))
                        return false;
                }
                out += '}';
            } else if (f->is_repeated()) {
                out += '[';
                for (int i = 0, n = r->FieldSize(m, f); i < n; i++) {
                    if (i)
                        out += ',';
                    if (!value(m, f, i))
                        return false;
                }
                out += ']';
            } else if (!value(m, f, -1)) {
                return false;
            }
        }
        out += '}';
        return true;
    }

    // A field the type does not declare: esmd_pb_decode names the first with find_unknown.
    bool unknown()
    {
        err.clear();
        return false;
    }

    // f's value in m, the i-th when repeated (i >= 0)
    bool value(const pb::Message &m, const pb::FieldDescriptor *f, int i)
    {
        const pb::Reflection *r = m.GetReflection();
        bool rep = i >= 0;
        switch (f->cpp_type()) {
        case pb::FieldDescriptor::CPPTYPE_INT32:
            integer(rep ? r->GetRepeatedInt32(m, f, i) : r->GetInt32(m, f), false);
            return true;
        case pb::FieldDescriptor::CPPTYPE_UINT32:
            digits(rep ? r->GetRepeatedUInt32(m, f, i) : r->GetUInt32(m, f), false, false);
            return true;
        case pb::FieldDescriptor::CPPTYPE_INT64:
            integer(rep ? r->GetRepeatedInt64(m, f, i) : r->GetInt64(m, f), true);
            return true;
        case pb::FieldDescriptor::CPPTYPE_UINT64:
            digits(rep ? r->GetRepeatedUInt64(m, f, i) : r->GetUInt64(m, f), false, true);
            return true;
        case pb::FieldDescriptor::CPPTYPE_DOUBLE:
            number(rep ? r->GetRepeatedDouble(m, f, i) : r->GetDouble(m, f), false);
            return true;
        case pb::FieldDescriptor::CPPTYPE_FLOAT:
            number(rep ? r->GetRepeatedFloat(m, f, i) : r->GetFloat(m, f), true);
            return true;
        case pb::FieldDescriptor::CPPTYPE_BOOL:
            out += (rep ? r->GetRepeatedBool(m, f, i) : r->GetBool(m, f)) ? "true" : "false";
            return true;
        case pb::FieldDescriptor::CPPTYPE_ENUM:
            enumerated(f->enum_type(),
                       rep ? r->GetRepeatedEnumValue(m, f, i) : r->GetEnumValue(m, f));
            return true;
        case pb::FieldDescriptor::CPPTYPE_STRING: {
            std::string scratch;
            const std::string &v = rep ? r->GetRepeatedStringReference(m, f, i, &scratch)
                                       : r->GetStringReference(m, f, &scratch);
            if (f->type() == pb::FieldDescriptor::TYPE_BYTES)
                base64(v);
            else
                string(v);
            return true;
        }
        case pb::FieldDescriptor::CPPTYPE_MESSAGE:
            return message(rep ? r->GetRepeatedMessage(m, f, i) : r->GetMessage(m, f));
        }
        err = "field " + f->full_name() + " has a type esmd does not know";
        return false;
    }

    bool well_known(const pb::Message &m)
    {
        std::string bin, json;
        if (!m.SerializeToString(&bin)) {
            err = m.GetDescriptor()->full_name() + " does not serialize";
            return false;
        }
        pb::util::Status st = pb::util::BinaryToJsonString(
            resolver_, std::string(kTypeUrlPrefix) + "/" + m.GetDescriptor()->full_name(), bin,
            &json, pb::util::JsonPrintOptions());
        if (!st.ok()) {
            err = "Protobuf to JSON: " + st.ToString();
            return false;
        }
        out += json;
        return true;
    }
};

// Nesting the walker takes (a map entry counts as a level); deeper data is left to libprotobuf,
// whose parse stops at ESMD_PB_MAX_DEPTH.
const int kWalkDepth = ESMD_PB_MAX_DEPTH - 4;

// A varint of at most 10 bytes whose value fits 64 bits; false when the data ends first (or a
// tenth byte carries more bits: left to libprotobuf).
inline bool varint(const unsigned char **pp, const unsigned char *e, uint64_t *v)
{
    const unsigned char *p = *pp;
    uint64_t r = 0;
    for (int i = 0; i < 10 && p < e; i++, p++) {
        uint64_t c = *p;
        if (i == 9 && c > 1)
            return false;
        r |= (c & 0x7f) << (7 * i);
        if (c < 0x80) {
            *v = r;
            *pp = p + 1;
            return true;
        }
    }
    return false;
}

inline uint64_t little_endian(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

// Protobuf's JSON mapping written straight from the wire data along the plans (WalkPlan), as
// kafka_schema.c walks Avro's binary: no message is built. It writes what JsonWriter writes from
// the parsed message, or gives up (false) on anything that is not plainly valid data of the
// schema: a field the type lacks, a wire type not the field's, a truncated or overlong value, a
// string that is not UTF-8, a proto2 enum number not declared, a required field missing, data
// nesting past kWalkDepth, a JSON rendering past the limit, a oneof's message member followed by
// another member. esmd_pb_decode then decodes the record with libprotobuf, which accepts it or
// says why not: the walker only ever makes an accepted record faster.
class WireWalker : public JsonOut
{
  public:
    WireWalker() : ranges_((size_t)kWalkDepth + 2) {}

    // The JSON of the message at [b, e) of type p, in out.
    bool record(const WalkPlan *p, const unsigned char *b, size_t len, size_t max)
    {
        out.clear();
        bad_utf8 = false;
        occ_.clear();
        max_ = max;
        Range r{b, b + len};
        return message(p, &r, 1, 0) && !bad_utf8 && out.size() <= max_;
    }

  private:
    // One occurrence of a field on the wire: a varint's or fixed value's bits in v, or a
    // length-delimited value at p, v bytes.
    struct Occ {
        const unsigned char *p;
        uint64_t v;
        uint32_t slot, wire;
    };
    struct Range {
        const unsigned char *b, *e;
    };

    size_t max_ = 0;
    std::vector<Occ> occ_; // the occurrences of the messages being written, innermost last
    std::vector<std::vector<Range>> ranges_; // a message's occurrences to merge, by depth

    // The fields of one message, from one or more occurrences of it (merged as libprotobuf's
    // parse merges them: repeated fields appended, the last value of the others, messages merged).
    bool message(const WalkPlan *p, const Range *r, size_t nr, int depth)
    {
        if (depth > kWalkDepth || out.size() > max_)
            return false;
        int oneof_last[kWalkOneofs];
        for (int i = 0; i < p->d->oneof_decl_count(); i++)
            oneof_last[i] = -1;
        size_t base = occ_.size();
        for (size_t i = 0; i < nr; i++)
            if (!scan(p, r[i].b, r[i].e, oneof_last))
                return false;
        size_t end = occ_.size();
        // in field number order (as libprotobuf lists fields), each field's in wire order
        bool sorted = true;
        for (size_t i = base + 1; i < end && sorted; i++)
            sorted = occ_[i - 1].slot <= occ_[i].slot;
        if (!sorted)
            std::stable_sort(occ_.begin() + (ptrdiff_t)base, occ_.end(),
                             [](const Occ &a, const Occ &b) { return a.slot < b.slot; });
        out += '{';
        bool first = true;
        int required = 0;
        for (size_t i = base; i < end;) {
            uint32_t slot = occ_[i].slot;
            size_t j = i + 1;
            while (j < end && occ_[j].slot == slot)
                j++;
            const WalkField &f = p->fields[slot];
            required += f.required;
            if ((f.oneof < 0 || oneof_last[f.oneof] == (int)slot) && !field(f, i, j, &first, depth))
                return false;
            i = j;
        }
        if (required != p->nrequired)
            return false;
        out += '}';
        occ_.resize(base);
        return true;
    }

    // The occurrences of p's fields in [b, e), appended to occ_.
    bool scan(const WalkPlan *p, const unsigned char *b, const unsigned char *e, int *oneof_last)
    {
        while (b < e) {
            const unsigned char *t = b;
            uint64_t tag;
            if (!varint(&b, e, &tag) || b - t > 5 || tag > UINT32_MAX)
                return false;
            int slot = p->slot(tag >> 3);
            if (slot < 0)
                return false;
            const WalkField &f = p->fields[(size_t)slot];
            Occ o{b, 0, (uint32_t)slot, (uint32_t)(tag & 7)};
            if (o.wire == 2 && (f.wire == 2 || f.packable)) {
                if (!varint(&b, e, &o.v) || o.v > (uint64_t)(e - b))
                    return false;
                o.p = b;
                b += o.v;
                if (f.utf8 && !utf8((const char *)o.p, (size_t)o.v))
                    return false;
            } else if (o.wire != f.wire) {
                return false;
            } else if (o.wire == 0) {
                if (!varint(&b, e, &o.v) || (f.closed_enum && !declared(f, o.v)))
                    return false;
            } else if (o.wire == 1 || o.wire == 5) {
                int n = o.wire == 1 ? 8 : 4;
                if (e - b < n)
                    return false;
                o.v = little_endian(b, n);
                b += n;
            } else {
                return false;
            }
            if (f.oneof >= 0) {
                int &last = oneof_last[f.oneof];
                if (last >= 0 && last != slot && p->fields[(size_t)last].sub)
                    return false; // a message member cleared: its data is libprotobuf's to check
                last = slot;
            }
            occ_.push_back(o);
        }
        return true;
    }

    static bool declared(const WalkField &f, uint64_t v)
    {
        return f.f->enum_type()->FindValueByNumber((int32_t)(uint32_t)v) != nullptr;
    }

    // The field f of occurrences occ_[i, j), after a comma unless first.
    bool field(const WalkField &f, size_t i, size_t j, bool *first, int depth)
    {
        size_t mark = out.size();
        if (!*first)
            out += ',';
        out += f.name;
        if (f.map) {
            out += '{';
            for (size_t k = i; k < j; k++) {
                if (k > i)
                    out += ',';
                Occ o = occ_[k];
                if (!entry(f.sub, o.p, o.p + o.v, depth + 1))
                    return false;
            }
            out += '}';
        } else if (f.repeated) {
            out += '[';
            size_t n = 0;
            for (size_t k = i; k < j; k++) {
                Occ o = occ_[k];
                if (f.sub) {
                    if (n++)
                        out += ',';
                    Range r{o.p, o.p + o.v};
                    if (!message(f.sub, &r, 1, depth + 1))
                        return false;
                } else if (o.wire == 2 && f.wire != 2) {
                    if (!packed(f, o.p, o.p + o.v, &n))
                        return false;
                } else {
                    if (n++)
                        out += ',';
                    scalar(f, o);
                }
            }
            if (!n) { // only empty packed data: no value, as libprotobuf lists it
                out.resize(mark);
                return true;
            }
            out += ']';
        } else if (f.sub) {
            std::vector<Range> &rs = ranges_[(size_t)depth];
            rs.clear();
            for (size_t k = i; k < j; k++)
                rs.push_back(Range{occ_[k].p, occ_[k].p + occ_[k].v});
            if (!message(f.sub, rs.data(), rs.size(), depth + 1))
                return false;
        } else {
            const Occ &o = occ_[j - 1];
            if (!f.presence && is_default(f, o)) {
                out.resize(mark);
                return true;
            }
            scalar(f, o);
        }
        *first = false;
        return true;
    }

    bool packed(const WalkField &f, const unsigned char *b, const unsigned char *e, size_t *n)
    {
        while (b < e) {
            Occ o{nullptr, 0, 0, f.wire};
            if (f.wire == 0) {
                if (!varint(&b, e, &o.v) || (f.closed_enum && !declared(f, o.v)))
                    return false;
            } else {
                int w = f.wire == 1 ? 8 : 4;
                if (e - b < w)
                    return false;
                o.v = little_endian(b, w);
                b += w;
            }
            if ((*n)++)
                out += ',';
            scalar(f, o);
        }
        return true;
    }

    // A map entry: its key and value, each the default when the entry lacks it.
    bool entry(const WalkPlan *ep, const unsigned char *b, const unsigned char *e, int depth)
    {
        if (depth > kWalkDepth || ep->fields.size() != 2)
            return false;
        size_t base = occ_.size();
        int none[1] = {-1}; // an entry has no oneof
        if (!scan(ep, b, e, none))
            return false;
        size_t end = occ_.size();
        const WalkField &kf = ep->fields[0], &vf = ep->fields[1];
        Occ key = absent(kf), value = absent(vf);
        for (size_t k = base; k < end; k++)
            (occ_[k].slot == 0 ? key : value) = occ_[k];
        map_key(kf.f, [&] {
            scalar(kf, key);
            return true;
        });
        out += ':';
        if (vf.sub) {
            std::vector<Range> &rs = ranges_[(size_t)depth];
            rs.clear();
            for (size_t k = base; k < end; k++)
                if (occ_[k].slot == 1)
                    rs.push_back(Range{occ_[k].p, occ_[k].p + occ_[k].v});
            if (!message(vf.sub, rs.data(), rs.size(), depth + 1))
                return false;
        } else {
            scalar(vf, value);
        }
        occ_.resize(base);
        return true;
    }

    static Occ absent(const WalkField &f)
    {
        Occ o{(const unsigned char *)"", 0, 0, f.wire};
        if (f.type == pb::FieldDescriptor::TYPE_ENUM)
            o.v = (uint32_t)f.f->default_value_enum()->number();
        return o;
    }

    static bool is_default(const WalkField &f, const Occ &o)
    {
        switch (f.type) {
        case pb::FieldDescriptor::TYPE_INT32:
        case pb::FieldDescriptor::TYPE_SINT32:
        case pb::FieldDescriptor::TYPE_UINT32:
        case pb::FieldDescriptor::TYPE_FIXED32:
        case pb::FieldDescriptor::TYPE_SFIXED32:
        case pb::FieldDescriptor::TYPE_FLOAT:
        case pb::FieldDescriptor::TYPE_ENUM:
            return (uint32_t)o.v == 0;
        default: // 64-bit values, bool, and the length of strings and bytes
            return o.v == 0;
        }
    }

    void scalar(const WalkField &f, const Occ &o)
    {
        uint32_t u32 = (uint32_t)o.v;
        switch (f.type) {
        case pb::FieldDescriptor::TYPE_INT32:
        case pb::FieldDescriptor::TYPE_SFIXED32:
            integer((int32_t)u32, false);
            break;
        case pb::FieldDescriptor::TYPE_SINT32:
            integer((int32_t)((u32 >> 1) ^ (0u - (u32 & 1))), false);
            break;
        case pb::FieldDescriptor::TYPE_UINT32:
        case pb::FieldDescriptor::TYPE_FIXED32:
            digits(u32, false, false);
            break;
        case pb::FieldDescriptor::TYPE_INT64:
        case pb::FieldDescriptor::TYPE_SFIXED64:
            integer((int64_t)o.v, true);
            break;
        case pb::FieldDescriptor::TYPE_SINT64:
            integer((int64_t)((o.v >> 1) ^ (0 - (o.v & 1))), true);
            break;
        case pb::FieldDescriptor::TYPE_UINT64:
        case pb::FieldDescriptor::TYPE_FIXED64:
            digits(o.v, false, true);
            break;
        case pb::FieldDescriptor::TYPE_FLOAT: {
            float x;
            memcpy(&x, &u32, sizeof(x));
            number(x, true);
            break;
        }
        case pb::FieldDescriptor::TYPE_DOUBLE: {
            double x;
            memcpy(&x, &o.v, sizeof(x));
            number(x, false);
            break;
        }
        case pb::FieldDescriptor::TYPE_BOOL:
            out += o.v ? "true" : "false";
            break;
        case pb::FieldDescriptor::TYPE_ENUM:
            enumerated(f.f->enum_type(), (int32_t)u32);
            break;
        case pb::FieldDescriptor::TYPE_STRING:
            string((const char *)o.p, (size_t)o.v);
            break;
        case pb::FieldDescriptor::TYPE_BYTES:
            base64((const char *)o.p, (size_t)o.v);
            break;
        default: // messages and groups are not scalars
            break;
        }
    }
};

// The record as JSON, malloc'd (what esmd_pb_decode returns).
char *copy_out(const std::string &out, size_t *json_len, char *err, size_t errlen)
{
    char *r = static_cast<char *>(malloc(out.size() + 1));
    if (!r) {
        set_err(err, errlen, "out of memory");
        return nullptr;
    }
    memcpy(r, out.data(), out.size());
    r[out.size()] = '\0';
    *json_len = out.size();
    return r;
}
} // namespace

extern "C" char *esmd_pb_decode(const struct esmd_pb_schema *s, const int64_t *idx, size_t n,
                                const unsigned char *msg, size_t len, size_t max_json,
                                size_t *json_len, char *err, size_t errlen)
{
    return esmd_pb_decode_via(ESMD_PB_DECODE_ANY, s, idx, n, msg, len, max_json, json_len, err,
                              errlen);
}

extern "C" char *esmd_pb_decode_via(enum esmd_pb_way way, const struct esmd_pb_schema *s,
                                    const int64_t *idx, size_t n, const unsigned char *msg,
                                    size_t len, size_t max_json, size_t *json_len, char *err,
                                    size_t errlen)
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
        if (way != ESMD_PB_DECODE_REFLECTION) {
            auto it = s->plans.find(d);
            if (it != s->plans.end() && it->second->ok) {
                static thread_local WireWalker walker;
                if (walker.record(it->second.get(), msg, len, max_json)) {
                    char *r = copy_out(walker.out, json_len, err, errlen);
                    if (walker.out.capacity() > ((size_t)1 << 20))
                        std::string().swap(walker.out);
                    return r;
                }
            }
            if (way == ESMD_PB_DECODE_WALK) {
                set_err(err, errlen, "the wire walker does not take this record");
                return nullptr;
            }
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
        if (s->has_required && !m->IsInitialized()) {
            set_err(err, errlen,
                    d->full_name() + " misses required fields: " + m->InitializationErrorString());
            return nullptr;
        }
        // The writer stops at a field the schema lacks, which is named as find_unknown finds it
        // (the first in field order): one walk of the message for records without any.
        JsonWriter w(s->resolver.get(), max_json);
        if (!w.message(*m)) {
            std::string where;
            if (find_unknown(*m, &where))
                set_err(err, errlen, where + " (not written with this schema)");
            else
                set_err(err, errlen, w.err.empty() ? "field not in the schema" : w.err);
            return nullptr;
        }
        if (w.bad_utf8) {
            set_err(err, errlen, "a string of the " + d->full_name() + " is not UTF-8");
            return nullptr;
        }
        const std::string &out = w.out;
        if (out.size() > max_json) {
            set_err(err, errlen, "decoded record is larger than the event can carry");
            return nullptr;
        }
        return copy_out(out, json_len, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("libprotobuf: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "libprotobuf failed");
    }
    return nullptr;
}
