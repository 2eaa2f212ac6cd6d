# frozen_string_literal: true

# A small plain-Ruby Sidekiq app used by the local inventory and the tests.
#
# Every job records its job id in the Redis set "demo:done" when it finishes, so a test can count by job id
# that each enqueued job ran exactly as often as expected. Runs on Sidekiq 6.4 (Debian's ruby-sidekiq).
require "sidekiq"

Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)

module Demo
  DONE_KEY = "demo:done"
  RUNS_KEY = "demo:runs"

  def self.record(jid)
    Sidekiq.redis do |conn|
      conn.multi do |transaction|
        transaction.sadd(DONE_KEY, jid)
        transaction.hincrby(RUNS_KEY, jid, 1)
      end
    end
  end
end

# Finishes at once.
class FastJob
  include Sidekiq::Worker
  sidekiq_options queue: "default"

  def perform(*_args)
    Demo.record(jid)
  end
end

# Sleeps for the given number of seconds, in short steps, then records itself.
class SlowJob
  include Sidekiq::Worker
  sidekiq_options queue: "slow"

  def perform(seconds = 5)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds.to_f
    sleep 0.1 while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
    Demo.record(jid)
  end
end

# Raises on every run, so it goes through the retry set and ends in the dead set.
class FailingJob
  include Sidekiq::Worker
  sidekiq_options queue: "default", retry: 1

  def perform(*_args)
    raise ArgumentError, "FailingJob fails on purpose (demo of retries)"
  end
end
