# frozen_string_literal: true

# Time Sidekiq's own Ruby API reading the same state as sidekiq_ops.fleet.queue_info, and count its round trips.
#
#   REDIS_URL=redis://127.0.0.1:PORT/0 ruby sidekiq_api_read.rb REPEATS
#
# One read is: Sidekiq::Stats.new with enqueued and workers_size, size and latency of every queue,
# ProcessSet.new.each and Workers.new.each (the equivalent set). A first read warms up connections and is
# not timed. Prints JSON with the wall time of each timed read in seconds, and the round trips, commands and
# Redis time of one read. Round trips are calls of Redis::Client#process, which writes a command or a whole
# pipeline and reads the replies. Commands and Redis time come from INFO commandstats.
require "json"
require "sidekiq/api"

Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

# Counts network round trips of redis-rb 4.x: every command and every pipeline goes through #process once.
module RoundTripCounter
  class << self
    attr_accessor :count
  end
  self.count = 0

  def process(commands, &block)
    RoundTripCounter.count += 1
    super
  end
end
Redis::Client.prepend(RoundTripCounter)

def read_everything
  stats = Sidekiq::Stats.new
  totals = [stats.processed, stats.failed, stats.enqueued, stats.workers_size, stats.scheduled_size,
            stats.retry_size, stats.dead_size]
  queues = Sidekiq::Queue.all.map { |queue| [queue.name, queue.size, queue.latency] }
  processes = Sidekiq::ProcessSet.new.map { |process| [process.identity, process["busy"], process["concurrency"]] }
  busy = Sidekiq::Workers.new.map { |process_id, _thread_id, work| [process_id, work["queue"]] }
  [totals, queues.size, processes.size, busy.size]
end

# Sum calls and microseconds over all commands but INFO itself.
def command_totals(conn)
  conn.info("commandstats").reject { |name, _| name == "info" }.values.each_with_object([0, 0]) do |value, totals|
    totals[0] += value["calls"].to_i
    totals[1] += value["usec"].to_i
  end
end

repeats = Integer(ARGV.fetch(0, "5"))
shape = read_everything

calls_before, usec_before = Sidekiq.redis { |conn| command_totals(conn) }
RoundTripCounter.count = 0
read_everything
round_trips = RoundTripCounter.count
calls_after, usec_after = Sidekiq.redis { |conn| command_totals(conn) }

seconds = Array.new(repeats) do
  started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  read_everything
  Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
end

puts JSON.generate(
  "seconds" => seconds,
  "round_trips" => round_trips,
  "commands" => calls_after - calls_before,
  "redis_usec" => usec_after - usec_before,
  "queues" => shape[1],
  "processes" => shape[2],
  "busy" => shape[3]
)
