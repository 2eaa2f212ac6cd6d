# frozen_string_literal: true

# Print, as JSON, what Sidekiq's own Ruby API reports for the Redis in REDIS_URL. The tests compare the
# Python reader with this output field by field.
#
#   REDIS_URL=redis://127.0.0.1:PORT/0 ruby sidekiq_api_dump.rb
#
# The script only reads: ProcessSet is built with cleanup off, so stale entries stay in the processes set for
# the reader that runs next. read_started_at and read_finished_at bracket every read, so a test can bound
# how much a latency may differ between this read and its own.
require "json"
require "sidekiq/api"

Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

def job_set_summary(set, now)
  due_by_queue = Hash.new(0)
  due = 0
  set.each do |entry|
    next unless entry.score <= now

    due += 1
    due_by_queue[entry.item["queue"]] += 1
  end
  { "size" => set.size, "due" => due, "due_by_queue" => due_by_queue }
end

read_started_at = Time.now.to_f

stats = Sidekiq::Stats.new
stats_fields = %w[processed failed scheduled_size retry_size dead_size processes_size enqueued workers_size]
stats_values = stats_fields.to_h { |name| [name, stats.public_send(name)] }

queues = Sidekiq::Queue.all.to_h { |queue| [queue.name, { "size" => queue.size, "latency" => queue.latency }] }

processes = Sidekiq::ProcessSet.new(false).map do |process|
  {
    "identity" => process.identity,
    "hostname" => process["hostname"],
    "pid" => process["pid"],
    "tag" => process.tag,
    "labels" => process.labels,
    "concurrency" => process["concurrency"],
    "queues" => process.queues,
    "busy" => process["busy"],
    "quiet" => process.stopping?,
    "beat" => process["beat"],
    "rss" => process["rss"]
  }
end

workers = Sidekiq::Workers.new.map do |process_id, thread_id, work|
  { "process" => process_id, "thread" => thread_id, "queue" => work["queue"] }
end

now = Time.now.to_f
scheduled = job_set_summary(Sidekiq::ScheduledSet.new, now)
retries = job_set_summary(Sidekiq::RetrySet.new, now)
dead_size = Sidekiq::DeadSet.new.size

read_finished_at = Time.now.to_f

puts JSON.generate(
  "read_started_at" => read_started_at,
  "read_finished_at" => read_finished_at,
  "stats" => stats_values,
  "queues" => queues,
  "processes" => processes,
  "workers" => workers,
  "scheduled" => scheduled,
  "retries" => retries,
  "dead_size" => dead_size
)
