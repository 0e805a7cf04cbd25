// JSON Schema records of a schema registry (kafka_jsonschema.h, docs/kafka.md "Schema registry"):
// valijson's validator over nlohmann/json, behind a C API like kafka_protobuf.cc's.
//
// A schema is parsed once (nlohmann), compiled by valijson's SchemaParser for its draft (4, or 7
// for drafts 6 and 7), and then checked as a graph: valijson's validator recurses once per
// subschema applied to the same value (allOf, anyOf, oneOf, not, if/then/else, schema
// dependencies, a $ref), so a loop of those (`{"allOf": [{"$ref": "#"}]}`) would never end and a
// long chain would exhaust the stack: both are refused. Subschemas that descend into the data
// (properties, items, ...) are bounded by the record's nesting, checked before validating.
// Every entry point catches everything: no exception reaches C.
#include "kafka_jsonschema.h"

// valijson reports a bad schema by throwing (caught below) rather than aborting
#define VALIJSON_USE_EXCEPTIONS 1

#include <nlohmann/json.hpp>
#include <valijson/adapters/nlohmann_json_adapter.hpp>
#include <valijson/constraints/concrete_constraints.hpp>
#include <valijson/constraints/constraint_visitor.hpp>
#include <valijson/schema.hpp>
#include <valijson/schema_parser.hpp>
#include <valijson/validation_results.hpp>
#include <valijson/validator.hpp>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

namespace
{

using valijson::Subschema;
using valijson::constraints::Constraint;

void set_err(char *err, size_t errlen, const std::string &msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg.c_str());
}

// Longest chain of subschemas applied to one value that a schema may have.
const int kMaxChain = 64;

// How deep j nests (arrays and objects), stopping past limit.
int depth(const nlohmann::json &j, int limit)
{
    if (limit < 0 || !j.is_structured())
        return 0;
    int d = 0;
    for (const auto &v : j) {
        int c = depth(v, limit - 1);
        if (c > d)
            d = c;
        if (d > limit)
            break;
    }
    return d + 1;
}

// A string or property name of j longer than max.
bool long_string(const nlohmann::json &j, size_t max)
{
    if (j.is_string())
        return j.get_ref<const std::string &>().size() > max;
    if (j.is_object()) {
        for (const auto &kv : j.items())
            if (kv.key().size() > max || long_string(kv.value(), max))
                return true;
    } else if (j.is_array()) {
        for (const auto &v : j)
            if (long_string(v, max))
                return true;
    }
    return false;
}

// One subschema's edges: to subschemas applied to the same value (`same`) and to subschemas
// applied to values inside it (`inner`); and whether it matches strings with regexes.
class Edges : public valijson::constraints::ConstraintVisitor
{
  public:
    std::vector<const Subschema *> same, inner;
    bool regex = false;

    // A pattern the validator will compile: compiled here so that a bad one refuses the schema
    // (std::regex_error) rather than each record.
    void compile(const std::string &pattern)
    {
        regex = true;
        // std::regex's compiler recurses once per group nesting level: a deep one (a few
        // thousand "(") overflows the stack before any regex_error.
        int level = 0, deepest = 0;
        bool in_class = false;
        for (size_t i = 0; i < pattern.size(); i++) {
            char c = pattern[i];
            if (c == '\\')
                i++;
            else if (in_class)
                in_class = c != ']';
            else if (c == '[')
                in_class = true;
            else if (c == '(' && ++level > deepest)
                deepest = level;
            else if (c == ')' && level > 0)
                level--;
        }
        if (deepest > ESMD_JS_MAX_DEPTH)
            throw std::runtime_error("pattern \"" + pattern.substr(0, 60) +
                                     "...\" nests groups deeper than " +
                                     std::to_string(ESMD_JS_MAX_DEPTH) + " levels");
        std::regex r(pattern);
    }

    void add(std::vector<const Subschema *> &to, const Subschema *s)
    {
        if (s)
            to.push_back(s);
    }

    bool visit(const AllOfConstraint &c) override
    {
        c.applyToSubschemas([this](unsigned, const Subschema *s) {
            add(same, s);
            return true;
        });
        return true;
    }
    bool visit(const AnyOfConstraint &c) override
    {
        c.applyToSubschemas([this](unsigned, const Subschema *s) {
            add(same, s);
            return true;
        });
        return true;
    }
    bool visit(const OneOfConstraint &c) override
    {
        c.applyToSubschemas([this](unsigned, const Subschema *s) {
            add(same, s);
            return true;
        });
        return true;
    }
    bool visit(const ConditionalConstraint &c) override
    {
        add(same, c.getIfSubschema());
        add(same, c.getThenSubschema());
        add(same, c.getElseSubschema());
        return true;
    }
    bool visit(const NotConstraint &c) override
    {
        add(same, c.getSubschema());
        return true;
    }
    bool visit(const DependenciesConstraint &c) override
    {
        c.applyToSchemaDependencies([this](const auto &, const Subschema *s) {
            add(same, s);
            return true;
        });
        return true;
    }
    bool visit(const ContainsConstraint &c) override
    {
        add(inner, c.getSubschema());
        return true;
    }
    bool visit(const LinearItemsConstraint &c) override
    {
        c.applyToItemSubschemas([this](unsigned, const Subschema *s) {
            add(inner, s);
            return true;
        });
        add(inner, c.getAdditionalItemsSubschema());
        return true;
    }
    bool visit(const SingularItemsConstraint &c) override
    {
        add(inner, c.getItemsSubschema());
        return true;
    }
    bool visit(const PropertiesConstraint &c) override
    {
        c.applyToProperties([this](const auto &, const Subschema *s) {
            add(inner, s);
            return true;
        });
        c.applyToPatternProperties([this](const auto &p, const Subschema *s) {
            compile(std::string(p.c_str()));
            add(inner, s);
            return true;
        });
        add(inner, c.getAdditionalPropertiesSubschema());
        return true;
    }
    bool visit(const PropertyNamesConstraint &c) override
    {
        add(inner, c.getSubschema());
        return true;
    }
    bool visit(const PatternConstraint &c) override
    {
        compile(c.getPattern<std::string::allocator_type>());
        return true;
    }
    bool visit(const FormatConstraint &c) override
    {
        const std::string &f = c.getFormat();
        if (f == "date" || f == "time" || f == "date-time")
            regex = true;
        return true;
    }
    bool visit(const TypeConstraint &c) override
    {
        c.applyToSchemaTypes([this](unsigned, const Subschema *s) {
            add(same, s);
            return true;
        });
        return true;
    }
    bool visit(const ConstConstraint &) override
    {
        return true;
    }
    bool visit(const EnumConstraint &) override
    {
        return true;
    }
    bool visit(const MaximumConstraint &) override
    {
        return true;
    }
    bool visit(const MaxItemsConstraint &) override
    {
        return true;
    }
    bool visit(const MaxLengthConstraint &) override
    {
        return true;
    }
    bool visit(const MaxPropertiesConstraint &) override
    {
        return true;
    }
    bool visit(const MinimumConstraint &) override
    {
        return true;
    }
    bool visit(const MinItemsConstraint &) override
    {
        return true;
    }
    bool visit(const MinLengthConstraint &) override
    {
        return true;
    }
    bool visit(const MinPropertiesConstraint &) override
    {
        return true;
    }
    bool visit(const MultipleOfDoubleConstraint &) override
    {
        return true;
    }
    bool visit(const MultipleOfIntConstraint &) override
    {
        return true;
    }
    bool visit(const PolyConstraint &) override
    {
        return true;
    }
    bool visit(const RequiredConstraint &) override
    {
        return true;
    }
    bool visit(const UniqueItemsConstraint &) override
    {
        return true;
    }
};

struct Node {
    Edges edges;
    int state = 0; // 0 new, 1 on the path, 2 done
    int chain = 0; // longest chain of same-value subschemas from here
};

// The longest same-value chain from s (-1: a loop, or longer than kMaxChain).
int chain(std::map<const Subschema *, Node> &g, const Subschema *s, int level)
{
    Node &n = g[s];
    if (n.state == 1 || level > kMaxChain)
        return -1;
    if (n.state == 2)
        return n.chain;
    n.state = 1;
    int best = 0;
    for (const Subschema *t : n.edges.same) {
        int c = chain(g, t, level + 1);
        if (c < 0)
            return -1;
        if (c + 1 > best)
            best = c + 1;
    }
    n.state = 2;
    n.chain = best;
    // A chain found in parts (its tail memoized from another start) is as long as its whole.
    return best > kMaxChain ? -1 : best;
}

// Every subschema reachable from root, with its edges; false with why when the graph is one
// the validator cannot walk safely.
bool check_graph(const Subschema *root, bool *regex, std::string *why)
{
    std::map<const Subschema *, Node> g;
    std::vector<const Subschema *> todo{root};
    while (!todo.empty()) {
        const Subschema *s = todo.back();
        todo.pop_back();
        if (g.count(s))
            continue;
        Node &n = g[s];
        Subschema::ApplyFunction fn = [&n](const Constraint &c) { return c.accept(n.edges); };
        s->apply(fn);
        *regex = *regex || n.edges.regex;
        for (const Subschema *t : n.edges.same)
            todo.push_back(t);
        for (const Subschema *t : n.edges.inner)
            todo.push_back(t);
    }
    for (auto &kv : g) {
        if (chain(g, kv.first, 0) < 0) {
            *why = "subschemas refer to each other in a loop that applies to one value, or a "
                   "chain of more than " +
                   std::to_string(kMaxChain) + " of them";
            return false;
        }
    }
    return true;
}

// Every "$ref" of the schema document: "#" or "#/a/json/pointer" into this document only (a URL,
// a relative file name or a "#name" anchor would name another document or need $id scopes,
// which esmd does not fetch or follow), and no chain of $refs that only point to $refs loops
// (valijson's parser would recurse on it forever).
bool check_refs(const nlohmann::json &root, const nlohmann::json &j, int level, std::string *why)
{
    if (level > ESMD_JS_MAX_DEPTH || !j.is_structured())
        return true;
    if (j.is_object()) {
        auto r = j.find("$ref");
        if (r != j.end() && r->is_string()) {
            const nlohmann::json *cur = &j;
            for (int steps = 0;; steps++) {
                const std::string &ref = (*cur)["$ref"].get_ref<const std::string &>();
                if (ref.empty() || ref[0] != '#' || (ref.size() > 1 && ref[1] != '/')) {
                    *why = "$ref \"" + ref.substr(0, 100) +
                           "\" is not a JSON pointer into this schema (\"#/...\"): esmd does not "
                           "fetch other documents";
                    return false;
                }
                const nlohmann::json *t;
                try {
                    t = &root.at(nlohmann::json::json_pointer(ref.substr(1)));
                } catch (const std::exception &) {
                    *why = "$ref \"" + ref.substr(0, 100) + "\" names nothing in the schema";
                    return false;
                }
                auto next = t->is_object() ? t->find("$ref") : t->end();
                if (!t->is_object() || next == t->end() || !next->is_string())
                    break;
                if (steps >= kMaxChain) {
                    *why = "$refs refer to each other in a loop";
                    return false;
                }
                cur = t;
            }
        }
    }
    for (const auto &v : j)
        if (!check_refs(root, v, level + 1, why))
            return false;
    return true;
}

// How deep valijson's SchemaParser may recurse, in JSON levels: it descends into each subschema
// and follows a $ref into its target the first time it meets it. So a bound is the heaviest path
// from the root in the graph of the root and the $refs' targets (each weighing its height), with
// an edge from a node to the target of each $ref inside it. A path visits each member of a loop
// at most once: each strongly connected part weighs the sum of its members (Tarjan's algorithm,
// iteratively), and the parts form a DAG. The $refs are checked (check_refs) before.
long ref_depth(const nlohmann::json &root)
{
    std::vector<const nlohmann::json *> node{&root};
    std::map<const nlohmann::json *, int> id{{&root, 0}};
    std::vector<std::vector<int>> edges;
    std::vector<long> weight;
    for (size_t i = 0; i < node.size(); i++) {
        edges.emplace_back();
        long height = 0;
        std::vector<std::pair<const nlohmann::json *, long>> todo{{node[i], 1}};
        while (!todo.empty()) {
            const nlohmann::json *j = todo.back().first;
            long level = todo.back().second;
            todo.pop_back();
            if (!j->is_structured())
                continue;
            height = std::max(height, level);
            auto r = j->is_object() ? j->find("$ref") : j->end();
            if (j->is_object() && r != j->end() && r->is_string()) {
                const std::string &ref = r->get_ref<const std::string &>();
                const nlohmann::json *t = &root.at(nlohmann::json::json_pointer(ref.substr(1)));
                auto ins = id.emplace(t, (int)node.size());
                if (ins.second)
                    node.push_back(t);
                edges[i].push_back(ins.first->second);
            }
            for (const auto &v : *j)
                todo.emplace_back(&v, level + 1);
        }
        weight.push_back(height + 1);
    }
    size_t n = node.size();
    std::vector<int> index(n, -1), low(n, 0), comp(n, -1), stack;
    std::vector<bool> on(n, false);
    std::vector<long> best; // by part, in the order found: a part after those it reaches
    std::vector<std::pair<int, size_t>> calls{{0, 0}};
    int counter = 0;
    index[0] = low[0] = counter++;
    stack.push_back(0);
    on[0] = true;
    while (!calls.empty()) {
        int v = calls.back().first;
        if (calls.back().second < edges[v].size()) {
            int w = edges[v][calls.back().second++];
            if (index[w] < 0) {
                index[w] = low[w] = counter++;
                stack.push_back(w);
                on[w] = true;
                calls.emplace_back(w, 0);
            } else if (on[w]) {
                low[v] = std::min(low[v], index[w]);
            }
            continue;
        }
        calls.pop_back();
        if (!calls.empty())
            low[calls.back().first] = std::min(low[calls.back().first], low[v]);
        if (low[v] != index[v])
            continue;
        int c = (int)best.size();
        std::vector<int> members;
        long sum = 0, below = 0;
        for (;;) {
            int x = stack.back();
            stack.pop_back();
            on[x] = false;
            comp[x] = c;
            members.push_back(x);
            sum += weight[x];
            if (x == v)
                break;
        }
        for (int x : members)
            for (int y : edges[x])
                if (comp[y] != c)
                    below = std::max(below, best[comp[y]]);
        best.push_back(std::min(sum + below, (long)INT_MAX));
    }
    return best[comp[0]];
}

// The draft `$schema` names (valijson knows 4 and 7; 6 is read as 7).
bool draft(const nlohmann::json &j, valijson::SchemaParser::Version *v, std::string *why)
{
    if (!j.is_object() || !j.contains("$schema")) {
        *v = valijson::SchemaParser::kDraft7;
        return true;
    }
    const nlohmann::json &u = j["$schema"];
    if (!u.is_string()) {
        *why = "$schema is not a string";
        return false;
    }
    std::string s = u.get<std::string>();
    std::string t = s;
    if (t.rfind("https://", 0) == 0)
        t = "http://" + t.substr(8);
    if (!t.empty() && t.back() == '#')
        t.pop_back();
    if (t == "http://json-schema.org/draft-04/schema") {
        *v = valijson::SchemaParser::kDraft4;
        return true;
    }
    if (t == "http://json-schema.org/draft-06/schema" ||
        t == "http://json-schema.org/draft-07/schema") {
        *v = valijson::SchemaParser::kDraft7;
        return true;
    }
    *why = "$schema \"" + s.substr(0, 100) +
           "\" is not a draft esmd validates (drafts 4, 6 and 7: "
           "http://json-schema.org/draft-0N/schema#)";
    return false;
}

// "[name]" / "[3]" steps of valijson's context as a JSON pointer ("/name/3").
std::string pointer(const std::vector<std::string> &ctx)
{
    std::string p;
    for (const std::string &step : ctx) {
        if (step.size() < 2 || step.front() != '[' || step.back() != ']')
            continue; // "<root>"
        p += '/';
        for (char c : step.substr(1, step.size() - 2)) {
            if (c == '~')
                p += "~0";
            else if (c == '/')
                p += "~1";
            else
                p += c;
        }
    }
    return p.empty() ? "(the root)" : p;
}

} // namespace

struct esmd_js_schema {
    valijson::Schema schema;
    bool regex = false;
    // The validator keeps the schema's patterns compiled (std::regex) between records; a lock, as
    // a schema could be shared by threads.
    std::mutex mu;
    valijson::Validator validator;
};

extern "C" struct esmd_js_schema *esmd_js_schema_new(const char *text, size_t len, char *err,
                                                     size_t errlen)
{
    try {
        nlohmann::json j = nlohmann::json::parse(text, text + len, nullptr, false);
        if (j.is_discarded()) {
            set_err(err, errlen, "the JSON schema is not JSON");
            return nullptr;
        }
        if (depth(j, ESMD_JS_MAX_DEPTH) > ESMD_JS_MAX_DEPTH) {
            set_err(err, errlen,
                    "the JSON schema nests deeper than " + std::to_string(ESMD_JS_MAX_DEPTH) +
                        " levels");
            return nullptr;
        }
        if (!j.is_object() && !j.is_boolean()) {
            set_err(err, errlen, "the JSON schema is not an object");
            return nullptr;
        }
        valijson::SchemaParser::Version v;
        std::string why;
        if (!draft(j, &v, &why)) {
            set_err(err, errlen, "the JSON schema cannot be used: " + why);
            return nullptr;
        }
        if (!check_refs(j, j, 0, &why)) {
            set_err(err, errlen, "the JSON schema cannot be used: " + why);
            return nullptr;
        }
        long d = ref_depth(j);
        if (d > ESMD_JS_MAX_REF_DEPTH) {
            set_err(err, errlen,
                    "the JSON schema cannot be used: followed through its $refs, it nests "
                    "deeper than " +
                        std::to_string(ESMD_JS_MAX_REF_DEPTH) + " levels (at most " +
                        std::to_string(d) + ")");
            return nullptr;
        }
        std::unique_ptr<esmd_js_schema> s(new esmd_js_schema());
        valijson::SchemaParser parser(v);
        valijson::adapters::NlohmannJsonAdapter adapter(j);
        // no fetch function: a $ref to another document throws ("Fetching of remote JSON
        // References not enabled.")
        parser.populateSchema(adapter, s->schema);
        if (!check_graph(&s->schema, &s->regex, &why)) {
            set_err(err, errlen, "the JSON schema cannot be used: " + why);
            return nullptr;
        }
        return s.release();
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("the JSON schema cannot be used: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "the JSON schema cannot be used");
    }
    return nullptr;
}

extern "C" void esmd_js_schema_free(struct esmd_js_schema *s)
{
    delete s;
}

extern "C" bool esmd_js_validate(const struct esmd_js_schema *s, const char *doc, size_t len,
                                 char *err, size_t errlen)
{
    try {
        nlohmann::json j = nlohmann::json::parse(doc, doc + len, nullptr, false);
        if (j.is_discarded()) {
            set_err(err, errlen, "the data is not JSON");
            return false;
        }
        if (depth(j, ESMD_JS_MAX_DEPTH) > ESMD_JS_MAX_DEPTH) {
            set_err(err, errlen,
                    "the data nests deeper than " + std::to_string(ESMD_JS_MAX_DEPTH) + " levels");
            return false;
        }
        if (s->regex && long_string(j, ESMD_JS_MAX_REGEX_INPUT)) {
            set_err(err, errlen,
                    "the data has a string longer than " + std::to_string(ESMD_JS_MAX_REGEX_INPUT) +
                        " bytes, which esmd does not match against the schema's patterns");
            return false;
        }
        valijson::adapters::NlohmannJsonAdapter adapter(j);
        {
            auto *w = const_cast<esmd_js_schema *>(s);
            std::lock_guard<std::mutex> lock(w->mu);
            if (w->validator.validate(s->schema, adapter, nullptr))
                return true;
        }
        valijson::ValidationResults results;
        valijson::Validator again;
        again.validate(s->schema, adapter, &results);
        // the most specific error: the deepest value, the first found there
        const valijson::ValidationResults::Error *best = nullptr;
        for (const auto &e : results)
            if (!best || e.context.size() > best->context.size())
                best = &e;
        if (!best) {
            set_err(err, errlen, "the data does not match its JSON schema");
            return false;
        }
        std::string where = pointer(best->context);
        if (where.size() > 200)
            where = where.substr(0, 200) + "...";
        set_err(err, errlen,
                "the data does not match its JSON schema at " + where + ": " +
                    best->description.substr(0, 200));
        return false;
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("JSON Schema validation failed: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "JSON Schema validation failed");
    }
    return false;
}
