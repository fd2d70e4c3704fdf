package ibstream.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.File;
import java.io.IOException;
import java.io.PrintStream;
import java.math.BigDecimal;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.time.LocalDate;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collection;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import org.apache.avro.Conversions;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.data.TimeConversions;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericEnumSymbol;
import org.apache.avro.generic.GenericFixed;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.utils.Utils;

/**
 * Reads ibstream's data topics as a JVM consumer would and prints what it found, one JSON object
 * a line on stdout.
 *
 * <p>Each topic is read with {@code isolation.level=read_committed} from its beginning to its
 * end, the end being the consumer's end offsets under read_committed (the last stable offset),
 * taken once before reading. Each value is decoded with Avro Java against the project's schema
 * of its stream: single-object encoding through {@link BinaryMessageDecoder} (the header's
 * CRC-64-AVRO fingerprint must be the schema's), or Confluent framing (magic 0, a 4-byte
 * big-endian schema id) with the writer's schema fetched by id from the registry and resolved
 * against the project's schema. Each record's key must sit in the partition Java's default
 * partitioner gives it ({@code BuiltInPartitioner.partitionForKey}: murmur2 of the key bytes,
 * made positive, modulo the partition count).
 *
 * <p>Usage: {@code ReadTopics BOOTSTRAP SCHEMA_DIR PREFIX FRAMING [REGISTRY_URL USER PASSWORD]}
 * where FRAMING is {@code single-object} or {@code confluent} and the topics are
 * {@code PREFIX.leads}, {@code .customers}, {@code .transactions}, {@code .servers},
 * {@code .positions}.
 *
 * <p>Lines: {@code {"kind":"latest","topic","key","partition","offset","value"}} per key (its
 * last record), {@code {"kind":"misplaced","topic","key","partition","expected"}} per record in
 * another partition than Java's, {@code {"kind":"undecodable","topic","partition","offset",
 * "error"}} per value Avro Java cannot read, and a last {@code {"kind":"summary","topics":{…}}}
 * with per topic its partitions, records read, distinct keys, misplaced and undecodable records,
 * duplicates (records whose key and {@code meta.eventId} came before), end offsets and the
 * milliseconds its read took. In values, decimals are
 * {@code {"decimal": BigDecimal.toPlainString()}} (the schema's scale, exact), timestamps
 * {@code {"instant": Instant.toString()}}, dates {@code {"date": "YYYY-MM-DD"}}, enums their
 * symbol, maps objects, arrays lists. Exits 1 on a fatal error (a topic that is missing, an end
 * not reached within 120 s), 2 on bad arguments.
 */
public final class ReadTopics {
  private static final Map<String, String> EVENTS = new LinkedHashMap<>();

  static {
    EVENTS.put("leads", "LeadEvent");
    EVENTS.put("customers", "CustomerEvent");
    EVENTS.put("transactions", "TransactionEvent");
    EVENTS.put("servers", "ServerEvent");
    EVENTS.put("positions", "PositionEvent");
  }

  /** Types the event schemas name; each file defines one, parsed before the events. */
  private static final String[] SHARED = {"EventMeta", "TradingAccount", "UtmDetails", "TagCategory"};

  private static final ObjectMapper JSON = new ObjectMapper();
  private static final JsonNodeFactory NODES = JsonNodeFactory.instance;

  private ReadTopics() {}

  public static void main(String[] args) throws Exception {
    if (args.length != 4 && args.length != 7) {
      System.err.println(
          "usage: ReadTopics BOOTSTRAP SCHEMA_DIR PREFIX single-object|confluent"
              + " [REGISTRY_URL USER PASSWORD]");
      System.exit(2);
    }
    String bootstrap = args[0];
    File schemaDir = new File(args[1]);
    String prefix = args[2];
    boolean confluent;
    switch (args[3]) {
      case "single-object" -> confluent = false;
      case "confluent" -> confluent = true;
      default -> {
        System.err.println("framing must be single-object or confluent, not " + args[3]);
        System.exit(2);
        return;
      }
    }
    if (confluent && args.length != 7) {
      System.err.println("confluent framing needs REGISTRY_URL USER PASSWORD");
      System.exit(2);
    }
    Registry registry = confluent ? new Registry(args[4], args[5], args[6]) : null;

    GenericData model = new GenericData();
    model.addLogicalTypeConversion(new Conversions.DecimalConversion());
    model.addLogicalTypeConversion(new TimeConversions.TimestampMillisConversion());
    model.addLogicalTypeConversion(new TimeConversions.DateConversion());

    Map<String, Schema> schemas = parseSchemas(schemaDir);
    PrintStream out = new PrintStream(System.out, false, StandardCharsets.UTF_8);
    ObjectNode summary = NODES.objectNode();
    summary.put("kind", "summary");
    ObjectNode topics = summary.putObject("topics");

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // A partition at its end answers fetches after this wait: keep the read short.
    props.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, "100");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(
        ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      for (Map.Entry<String, String> stream : EVENTS.entrySet()) {
        String topic = prefix + "." + stream.getKey();
        Schema schema = schemas.get(stream.getValue());
        Decoder decoder =
            confluent ? new ConfluentDecoder(registry, schema, model) : new SingleObject(schema, model);
        ObjectNode counts = topics.putObject(topic);
        readTopic(consumer, topic, decoder, out, counts);
      }
    }
    out.println(JSON.writeValueAsString(summary));
    out.flush();
  }

  /** Parses the shared types, then each event schema, with one parser (names resolve across). */
  private static Map<String, Schema> parseSchemas(File dir) throws IOException {
    Schema.Parser parser = new Schema.Parser();
    for (String name : SHARED) {
      parser.parse(new File(dir, name + ".avsc"));
    }
    Map<String, Schema> out = new HashMap<>();
    for (String event : EVENTS.values()) {
      out.put(event, parser.parse(new File(dir, event + ".avsc")));
    }
    return out;
  }

  private static void readTopic(
      KafkaConsumer<byte[], byte[]> consumer,
      String topic,
      Decoder decoder,
      PrintStream out,
      ObjectNode counts)
      throws IOException {
    List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(30));
    if (infos == null || infos.isEmpty()) {
      throw new IllegalStateException("topic " + topic + " has no partitions (missing?)");
    }
    int partitions = infos.size();
    List<TopicPartition> assigned = new ArrayList<>();
    for (PartitionInfo info : infos) {
      assigned.add(new TopicPartition(topic, info.partition()));
    }
    consumer.assign(assigned);
    consumer.seekToBeginning(assigned);
    // Under read_committed: the last stable offset, the end of what is committed now.
    Map<TopicPartition, Long> end = consumer.endOffsets(assigned, Duration.ofSeconds(30));

    // Latest record per key, by key in key order: (partition, offset, value).
    Map<String, ObjectNode> latest = new TreeMap<>();
    long records = 0;
    long misplaced = 0;
    long undecodable = 0;
    // Records whose (key, eventId) came before: exactly-once means none.
    long duplicates = 0;
    Set<String> seen = new HashSet<>();
    long started = System.nanoTime();
    long deadline = System.nanoTime() + Duration.ofSeconds(120).toNanos();
    while (!reachedEnd(consumer, assigned, end)) {
      if (System.nanoTime() > deadline) {
        throw new IllegalStateException(
            topic + ": end offsets " + end + " not reached within 120 s");
      }
      ConsumerRecords<byte[], byte[]> batch = consumer.poll(Duration.ofMillis(200));
      for (ConsumerRecord<byte[], byte[]> record : batch) {
        if (record.offset() >= end.get(new TopicPartition(topic, record.partition()))) {
          continue; // committed after the end was taken: not part of this read
        }
        records++;
        byte[] keyBytes = record.key();
        String key = keyBytes == null ? null : new String(keyBytes, StandardCharsets.UTF_8);
        // What the default partitioner (BuiltInPartitioner.partitionForKey) picks for this key.
        Integer expected =
            keyBytes == null ? null : Utils.toPositive(Utils.murmur2(keyBytes)) % partitions;
        if (expected == null || expected != record.partition()) {
          misplaced++;
          ObjectNode line = NODES.objectNode();
          line.put("kind", "misplaced");
          line.put("topic", topic);
          line.put("key", key);
          line.put("partition", record.partition());
          line.put("offset", record.offset());
          if (expected == null) {
            line.putNull("expected");
          } else {
            line.put("expected", expected);
          }
          out.println(JSON.writeValueAsString(line));
        }
        JsonNode value;
        try {
          value = json(decoder.decode(record.value()));
        } catch (Exception e) {
          undecodable++;
          ObjectNode line = NODES.objectNode();
          line.put("kind", "undecodable");
          line.put("topic", topic);
          line.put("key", key);
          line.put("partition", record.partition());
          line.put("offset", record.offset());
          line.put("error", e.toString());
          out.println(JSON.writeValueAsString(line));
          continue;
        }
        if (!seen.add(key + "\u0000" + value.path("meta").path("eventId").asText())) {
          duplicates++;
        }
        ObjectNode line = NODES.objectNode();
        line.put("kind", "latest");
        line.put("topic", topic);
        line.put("key", key);
        line.put("partition", record.partition());
        line.put("offset", record.offset());
        line.set("value", value);
        // Records of one partition come in offset order; a key lives in one partition.
        latest.put(key == null ? "" : key, line);
      }
    }
    for (ObjectNode line : latest.values()) {
      out.println(JSON.writeValueAsString(line));
    }
    counts.put("partitions", partitions);
    counts.put("records", records);
    counts.put("keys", latest.size());
    counts.put("misplaced", misplaced);
    counts.put("undecodable", undecodable);
    counts.put("duplicates", duplicates);
    counts.put("readMillis", (System.nanoTime() - started) / 1_000_000);
    ArrayNode ends = counts.putArray("endOffsets");
    for (TopicPartition tp : assigned) {
      ends.add(end.get(tp));
    }
  }

  private static boolean reachedEnd(
      KafkaConsumer<byte[], byte[]> consumer,
      List<TopicPartition> assigned,
      Map<TopicPartition, Long> end) {
    for (TopicPartition tp : assigned) {
      if (consumer.position(tp) < end.get(tp)) {
        return false;
      }
    }
    return true;
  }

  /** A decoded Avro value as JSON, logical types tagged (see the class comment). */
  static JsonNode json(Object value) {
    if (value == null) {
      return NODES.nullNode();
    }
    if (value instanceof GenericRecord record) {
      ObjectNode node = NODES.objectNode();
      for (Schema.Field field : record.getSchema().getFields()) {
        node.set(field.name(), json(record.get(field.pos())));
      }
      return node;
    }
    if (value instanceof BigDecimal decimal) {
      return NODES.objectNode().put("decimal", decimal.toPlainString());
    }
    if (value instanceof Instant instant) {
      return NODES.objectNode().put("instant", instant.toString());
    }
    if (value instanceof LocalDate date) {
      return NODES.objectNode().put("date", date.toString());
    }
    if (value instanceof CharSequence text) {
      return NODES.textNode(text.toString());
    }
    if (value instanceof GenericEnumSymbol<?> symbol) {
      return NODES.textNode(symbol.toString());
    }
    if (value instanceof Boolean b) {
      return NODES.booleanNode(b);
    }
    if (value instanceof Integer i) {
      return NODES.numberNode(i);
    }
    if (value instanceof Long l) {
      return NODES.numberNode(l);
    }
    if (value instanceof Float f) {
      return NODES.numberNode(f);
    }
    if (value instanceof Double d) {
      return NODES.numberNode(d);
    }
    if (value instanceof Map<?, ?> map) {
      ObjectNode node = NODES.objectNode();
      for (Map.Entry<?, ?> entry : new TreeMap<>(stringKeys(map)).entrySet()) {
        node.set(entry.getKey().toString(), json(entry.getValue()));
      }
      return node;
    }
    if (value instanceof Collection<?> items) {
      ArrayNode node = NODES.arrayNode();
      for (Object item : items) {
        node.add(json(item));
      }
      return node;
    }
    if (value instanceof ByteBuffer bytes) {
      byte[] copy = new byte[bytes.remaining()];
      bytes.duplicate().get(copy);
      return NODES.objectNode().put("bytes", Base64.getEncoder().encodeToString(copy));
    }
    if (value instanceof GenericFixed fixed) {
      return NODES.objectNode().put("bytes", Base64.getEncoder().encodeToString(fixed.bytes()));
    }
    throw new IllegalArgumentException("no JSON form for " + value.getClass().getName());
  }

  private static Map<String, Object> stringKeys(Map<?, ?> map) {
    Map<String, Object> out = new HashMap<>();
    for (Map.Entry<?, ?> entry : map.entrySet()) {
      out.put(entry.getKey().toString(), entry.getValue());
    }
    return out;
  }

  /** Turns a record's value bytes into the stream's event. */
  interface Decoder {
    GenericRecord decode(byte[] bytes) throws IOException;
  }

  /**
   * Avro single-object encoding: C3 01, the schema's CRC-64-AVRO fingerprint (little-endian),
   * the binary datum. {@link BinaryMessageDecoder} refuses a header or fingerprint it does not
   * know.
   */
  static final class SingleObject implements Decoder {
    private final BinaryMessageDecoder<GenericRecord> decoder;

    SingleObject(Schema schema, GenericData model) {
      this.decoder = new BinaryMessageDecoder<>(model, schema);
    }

    @Override
    public GenericRecord decode(byte[] bytes) throws IOException {
      return decoder.decode(bytes);
    }
  }

  /**
   * Confluent framing: magic byte 0, a 4-byte big-endian schema id, the binary datum. The writer
   * schema is the registry's for that id, resolved against the project's schema; it must have
   * the project schema's parsing canonical form (the registry holds the contract).
   */
  static final class ConfluentDecoder implements Decoder {
    private final Registry registry;
    private final Schema reader;
    private final GenericData model;
    private final Map<Integer, GenericDatumReader<GenericRecord>> readers = new HashMap<>();

    ConfluentDecoder(Registry registry, Schema reader, GenericData model) {
      this.registry = registry;
      this.reader = reader;
      this.model = model;
    }

    @Override
    public GenericRecord decode(byte[] bytes) throws IOException {
      if (bytes == null || bytes.length < 5 || bytes[0] != 0) {
        throw new IOException("not Confluent framing (magic byte 0 and a schema id)");
      }
      int id = ByteBuffer.wrap(bytes, 1, 4).getInt();
      GenericDatumReader<GenericRecord> datumReader = readers.get(id);
      if (datumReader == null) {
        Schema writer = registry.schema(id);
        long got = SchemaNormalization.parsingFingerprint64(writer);
        long want = SchemaNormalization.parsingFingerprint64(reader);
        if (got != want) {
          throw new IOException(
              "registry schema " + id + " (" + writer.getFullName() + ") is not "
                  + reader.getFullName() + " of the project's schemas");
        }
        datumReader = new GenericDatumReader<>(writer, reader, model);
        readers.put(id, datumReader);
      }
      BinaryDecoder decoder = DecoderFactory.get().binaryDecoder(bytes, 5, bytes.length - 5, null);
      GenericRecord record = datumReader.read(null, decoder);
      if (!decoder.isEnd()) {
        throw new IOException("bytes left after the datum of schema " + id);
      }
      return record;
    }
  }

  /** A Confluent Schema Registry: GET /schemas/ids/{id} with basic auth. */
  static final class Registry {
    private final String url;
    private final String authorization;
    private final HttpClient http =
        HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();

    Registry(String url, String user, String password) {
      this.url = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
      this.authorization =
          "Basic "
              + Base64.getEncoder()
                  .encodeToString((user + ":" + password).getBytes(StandardCharsets.UTF_8));
    }

    Schema schema(int id) throws IOException {
      HttpRequest request =
          HttpRequest.newBuilder(URI.create(url + "/schemas/ids/" + id))
              .header("Authorization", authorization)
              .header("Accept", "application/vnd.schemaregistry.v1+json")
              .timeout(Duration.ofSeconds(10))
              .GET()
              .build();
      HttpResponse<String> response;
      try {
        response = http.send(request, HttpResponse.BodyHandlers.ofString());
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        throw new IOException("interrupted fetching schema " + id, e);
      }
      if (response.statusCode() != 200) {
        throw new IOException(
            "registry answered " + response.statusCode() + " for schema " + id + ": "
                + response.body());
      }
      JsonNode body = JSON.readTree(response.body());
      JsonNode schema = body.get("schema");
      if (schema == null || !schema.isTextual()) {
        throw new IOException("registry answer for schema " + id + " has no schema string");
      }
      return new Schema.Parser().parse(schema.asText());
    }
  }
}
